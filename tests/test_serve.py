"""`latentr3 serve` tested as a real server process on a loopback port, talked to with httpx: answers equal
to Recommender.recommend, every bad request, overload (429), deadlines (504), a disconnecting client,
SIGTERM draining."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"          # loopback only


def make_checkpoint(out: Path, n: int = 40):
    """A tiny untrained latent checkpoint with its catalogue copy (two items share a title)."""
    import torch

    from latentr3.config import ModelConfig
    from latentr3.data.dataset import save_catalogue_copy
    from latentr3.data.splits import Catalogue
    from latentr3.model.build import build_model

    words = "Blue Red Night Day Moon Road Train Love Song Live Best Hits Wall Kind".split()
    titles = [f"{words[i % 14]} {words[(i * 5 + 3) % 14]} {i}" for i in range(n)]
    titles[7] = titles[3]
    cat = Catalogue(path="mem", ids=list(range(100, 100 + n)), titles=titles)
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(backbone="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2,
                                         tiny_vocab=300, num_latent=1), titles, "albums")
    with torch.no_grad():            # a random init scores titles nearly uniformly: sharpen it
        model.backbone.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(out, tok, {"backbone": "tiny", "item_noun": "albums", "template": "paper",
                                     "cutoff_len": 512})
    save_catalogue_copy(out, cat)
    return titles


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, *args: str):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        self.log = open(ckpt.parent / f"server_{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "latentr3", "serve", "--model", str(ckpt), "--host", HOST,
                                      "--port", str(self.port), "--threads", "1", "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90.0) -> "Server":
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def post(self, path: str, body, **kw) -> "httpx.Response":
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def metric(self, line_start: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(line_start):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "ckpt"
    titles = make_checkpoint(ckpt)
    main = Server(ckpt, "--max-batch-users", "4", "--max-queue", "64", "--max-body-bytes", "4000")
    busy = Server(ckpt, "--max-batch-users", "1", "--max-queue", "1")
    late = Server(ckpt, "--timeout-s", "0.001")
    drain = Server(ckpt, "--max-batch-users", "1", "--max-queue", "200")    # one user at a time: a slow drain
    started = [main, busy, late, drain]
    try:
        for s in started:                 # the four start in parallel
            s.wait_ready()
        yield {"ckpt": ckpt, "titles": titles, "main": main, "busy": busy, "late": late,
               "drain": drain}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def recommender(servers):
    from latentr3.recommend import Recommender

    return Recommender.from_pretrained(servers["ckpt"], device="cpu")


HISTORIES = [["Blue Day 0", "Red Song 1"], [105, 120, 131], ["Kind Wall 27"], [100, "Moon Live 4", 139, 102, 117],
             ["Blue Day 28"] * 3, [111]]


def as_pairs(items):
    return [(i["title"], i["score"]) for i in items]


def test_answers_equal_recommender_recommend_inside_a_busy_batch(servers, recommender):
    srv = servers["main"]
    results: dict = {}

    def ask(i, exclude):
        results[i, exclude] = srv.post("/v1/recommend", {"history": HISTORIES[i], "k": 5, "exclude_history": exclude})

    threads = [threading.Thread(target=ask, args=(i, ex)) for i in range(len(HISTORIES)) for ex in (False, True)]
    for t in threads:       # 12 concurrent requests, 4 decoded at once: admitted at different steps
        t.start()
    for t in threads:
        t.join()
    for (i, exclude), r in results.items():
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["latency_ms"] > 0
        (want,) = recommender.recommend([HISTORIES[i]], k=5, exclude_history=exclude)
        got = body["items"]
        assert [g["title"] for g in got] == [w.title for w in want], (i, exclude)
        assert all(abs(g["score"] - w.score) <= 1e-5 for g, w in zip(got, want))
        assert [g["item_ids"] for g in got] == [w.item_ids for w in want]
        if exclude:
            history = set(recommender.history_titles(HISTORIES[i]))
            assert len(got) == 5 and not history & {g["title"] for g in got}
    assert any(set(recommender.history_titles(h)) & {g["title"] for g in results[i, False].json()["items"]}
               for i, h in enumerate(HISTORIES)), "exclude_history is not exercised: no history title recommended"
    # the batch form answers the same lists
    r = srv.post("/v1/recommend/batch", {"histories": HISTORIES[:3], "k": 5})
    assert r.status_code == 200, r.text
    for h, res in zip(HISTORIES[:3], r.json()["results"]):
        (want,) = recommender.recommend([h], k=5)
        assert [g["title"] for g in res["items"]] == [w.title for w in want]
    assert srv.metric("latentr3_batch_users_count") > 0
    assert srv.metric('latentr3_requests_total{endpoint="/v1/recommend",status="200"}') >= 12


def test_model_health_metrics_openapi_and_explain(servers, recommender):
    srv = servers["main"]
    health = httpx.get(srv.url + "/healthz").json()
    assert health["model_loaded"] and health["queue_depth"] >= 0 and health["requests_decoding"] == 0
    info = httpx.get(srv.url + "/v1/model").json()
    assert info["catalogue_items"] == 40 and info["catalogue_titles"] == 39
    assert info["decoding"]["num_beams"] == 10 and info["serving"]["max_batch_users"] == 4
    text = httpx.get(srv.url + "/metrics").text
    for name in ("latentr3_requests_total", "latentr3_queue_depth", "latentr3_active_users",
                 "latentr3_requests_decoding", "latentr3_batch_users_bucket",
                 "latentr3_request_latency_seconds_bucket"):
        assert name in text, name
    spec = httpx.get(srv.url + "/openapi.json").json()
    assert {"/v1/recommend", "/v1/recommend/batch", "/healthz", "/v1/model", "/metrics"} <= set(spec["paths"])
    assert "examples" in json.dumps(spec["components"]["schemas"]["RecommendRequest"])
    r = srv.post("/v1/recommend", {"history": HISTORIES[0], "k": 3, "explain": True})
    assert r.status_code == 200, r.text
    expl = r.json()["explanation"]
    assert [e["title"] for e in expl] == HISTORIES[0]
    assert all(0 < e["attention"] < 1 for e in expl) and sum(e["attention"] for e in expl) < 1
    want = recommender.explain(HISTORIES[0])
    assert [a for _, a in want] == pytest.approx([e["attention"] for e in expl], abs=1e-6)


BAD = [  # body, status, error kind, field named
    ({"history": ["Blue Dya 0"]}, 422, "unknown_item", "history[0]"),
    ({"history": [100, 9999]}, 422, "unknown_item", "history[1]"),
    ({"history": [1.5]}, 422, "invalid_request", "history[0]"),
    ({"history": "Blue Day 0"}, 422, "invalid_request", "history"),
    ({"history": []}, 422, "invalid_request", "history"),
    ({"history": [100], "k": 0}, 422, "invalid_request", "k"),
    ({"history": [100], "k": 11}, 422, "invalid_request", "k"),
    ({"history": [100], "k": "3"}, 422, "invalid_request", "k"),
    ({"history": [100], "exclude_history": "yes"}, 422, "invalid_request", "exclude_history"),
    ({"history": [100], "topk": 3}, 422, "invalid_request", "topk"),
    ({"k": 3}, 422, "invalid_request", "history"),
    ({"history": ["x" * 5000]}, 413, "body_too_large", "body"),
]


def test_bad_requests_name_the_field_and_the_server_keeps_serving(servers):
    srv = servers["main"]
    for body, status, kind, field in BAD:
        r = srv.post("/v1/recommend", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()
        assert err["error"] == kind and field in err["message"] and err["field"] == field, (body, err)
    err = srv.post("/v1/recommend", {"history": ["Blue Dya 0"]}).json()
    assert "Blue Day 0" in err["close_matches"]
    r = httpx.post(srv.url + "/v1/recommend", content=b'{"history": [100, ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json" and r.json()["field"] == "body"
    # a chunked body over the limit (no Content-Length)
    r = httpx.post(srv.url + "/v1/recommend", content=iter([b'{"history": ["', b"x" * 5000, b'"]}']), timeout=10)
    assert r.status_code == 413
    r = srv.post("/v1/recommend/batch", {"histories": [[100], [100, "Nope"]]})
    assert r.status_code == 422 and r.json()["field"] == "histories[1][1]"
    assert srv.metric('latentr3_errors_total{kind="unknown_item"}') >= 3
    assert srv.post("/v1/recommend", {"history": [100], "k": 2}).status_code == 200


def test_overload_gets_429_with_retry_after_and_nothing_else(servers):
    srv = servers["busy"]                   # one user decoded at a time, one waiting
    statuses, retry = [], []

    def ask(i):
        r = srv.post("/v1/recommend", {"history": HISTORIES[i % len(HISTORIES)]})
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 16 and set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
    assert all(r is not None and int(r) >= 1 for r in retry)
    # a batch larger than the queue is refused whole
    assert srv.post("/v1/recommend/batch", {"histories": HISTORIES[:3]}).status_code == 429
    assert srv.post("/v1/recommend", {"history": [100]}).status_code == 200


def test_past_the_deadline_gets_504_and_the_engine_recovers(servers):
    srv = servers["late"]                   # --timeout-s 0.001
    for _ in range(3):
        r = srv.post("/v1/recommend", {"history": HISTORIES[3]})
        assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded"
    for _ in range(50):
        health = httpx.get(srv.url + "/healthz").json()
        if health["active_users"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert health["active_users"] == 0 and health["queue_depth"] == 0
    assert srv.metric('latentr3_errors_total{kind="deadline_exceeded"}') == 3
    assert srv.metric("latentr3_users_abandoned_total") == 3


def test_a_client_that_disconnects_mid_request_is_dropped_and_others_are_served(servers, recommender):
    srv = servers["main"]
    body = json.dumps({"histories": [HISTORIES[i % 6] for i in range(64)], "k": 10}).encode()
    with socket.create_connection((HOST, srv.port)) as s:
        s.sendall(b"POST /v1/recommend/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for _ in range(100):                # until its users are in the engine
            if httpx.get(srv.url + "/healthz").json()["active_users"] > 0:
                break
            time.sleep(0.02)
    # gone: the server notices and drops its 64 users instead of decoding them all
    for _ in range(200):
        if srv.metric('latentr3_errors_total{kind="client_disconnected"}') >= 1:
            break
        time.sleep(0.05)
    assert srv.metric('latentr3_errors_total{kind="client_disconnected"}') >= 1
    for _ in range(100):
        health = httpx.get(srv.url + "/healthz").json()
        if health["active_users"] == 0 and health["queue_depth"] == 0:
            break
        time.sleep(0.05)
    assert health["active_users"] == 0 and health["queue_depth"] == 0
    assert srv.metric("latentr3_users_abandoned_total") >= 32      # dropped, not decoded for nobody
    r = srv.post("/v1/recommend", {"history": HISTORIES[1], "k": 4})
    (want,) = recommender.recommend([HISTORIES[1]], k=4)
    assert r.status_code == 200 and [i["title"] for i in r.json()["items"]] == [w.title for w in want]


def batch_requests_in_threads(srv: Server, requests: int, users: int):
    """Starts `requests` threads, each sending one batch request of `users` histories; (threads, responses)."""
    results = []

    def ask():
        results.append(srv.post("/v1/recommend/batch", {"histories": [HISTORIES[i % 6] for i in range(users)]}))

    threads = [threading.Thread(target=ask) for _ in range(requests)]
    for t in threads:
        t.start()
    return threads, results


def test_sigterm_drains_accepted_requests_refuses_new_ones_and_exits_0(servers):
    srv = servers["drain"]
    threads, results = batch_requests_in_threads(srv, 5, 12)
    # SIGTERM goes once all five requests are accepted and users still wait. (A threshold on the queue
    # alone never fired on a fast host that decoded as fast as the requests came.)
    for _ in range(1000):
        health = httpx.get(srv.url + "/healthz").json()
        if health["requests_decoding"] == 5 and health["queue_depth"] > 0:
            break
        time.sleep(0.005)
    assert health["requests_decoding"] == 5 and health["queue_depth"] > 0, health
    srv.proc.send_signal(signal.SIGTERM)
    # the late request goes as soon as the server says it is draining: a fixed sleep raced the drain,
    # which a fast host finished (and closed the socket) within 0.2 s
    for _ in range(500):
        draining = httpx.get(srv.url + "/healthz")
        if draining.status_code == 503:
            break
        time.sleep(0.005)
    assert draining.status_code == 503
    late = srv.post("/v1/recommend", {"history": [100]})
    assert late.status_code == 503 and late.json()["error"] == "shutting_down"
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 5
    assert all(len(r.json()["results"]) == 12 for r in results)
    assert srv.proc.wait(60) == 0, srv.output()


def test_workers_share_the_port_answer_alike_are_restarted_and_drain(servers, recommender):
    """--workers 2: connections reach both (SO_REUSEPORT), each answers as Recommender.recommend, a killed
    worker is replaced, SIGTERM drains both and the supervisor exits 0."""
    srv = Server(servers["ckpt"], "--workers", "2", "--max-batch-users", "2").wait_ready()
    try:
        def workers_seen(n=60):
            seen = {}
            for _ in range(n):                # a new connection each time: spread by address hash
                try:
                    h = httpx.get(srv.url + "/healthz").json()
                except httpx.TransportError:  # the dead worker's unaccepted connections are reset
                    continue
                seen[h["worker"]] = h["pid"]
                if len(seen) == 2:
                    break
            return seen

        seen = workers_seen()
        assert sorted(seen) == [0, 1] and len(set(seen.values())) == 2
        want = recommender.recommend(HISTORIES, k=5)
        for h, w in zip(HISTORIES, want):
            got = srv.post("/v1/recommend", {"history": h, "k": 5}).json()["items"]
            assert [g["title"] for g in got] == [r.title for r in w]
            assert [g["score"] for g in got] == pytest.approx([r.score for r in w], abs=1e-5)
        os.kill(seen[1], signal.SIGKILL)     # a worker dies: the supervisor starts another in its place
        for _ in range(300):
            again = workers_seen(10)
            if sorted(again) == [0, 1] and again[1] != seen[1]:
                break
            time.sleep(0.1)
        assert sorted(again) == [0, 1] and again[1] != seen[1] and again[0] == seen[0], (seen, again, srv.output())
        threads, results = batch_requests_in_threads(srv, 4, 8)
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 4
        assert srv.proc.wait(60) == 0, srv.output()
        for pid in again.values():            # no worker left behind
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        srv.stop()


def test_workers_that_cannot_load_stop_the_supervisor(tmp_path):
    srv = Server(tmp_path / "missing", "--workers", "2")
    try:
        assert srv.proc.wait(120) == 2
        assert "cannot start" in srv.output() and "missing" in srv.output()
    finally:
        srv.stop()


def test_serve_rejects_bad_options_before_loading(tmp_path, capsys):
    from latentr3.cli import main

    for opt, value in (("--timeout-s", "0"), ("--max-batch-users", "0"), ("--admit-at", "99"), ("--port", "70000"),
                       ("--workers", "0")):
        assert main(["serve", "--model", str(tmp_path / "missing"), opt, value]) == 2
        assert opt in capsys.readouterr().err


def test_recommend_cli_excludes_history_and_explains(servers, capsys):
    from latentr3.cli import main

    history = ["Blue Day 0", "Red Song 1"]
    assert main(["recommend", "--model", str(servers["ckpt"]), "--history", *history, "-k", "10", "--json",
                 "--exclude-history", "--explain"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["items"]) == 10 and not set(history) & {i["title"] for i in out["items"]}
    assert [e["title"] for e in out["explanation"]] == history
