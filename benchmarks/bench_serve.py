"""Load test of `latentr3 serve`: closed-loop clients at several concurrency levels, then an overload phase.

Run (a checkpoint written by `latentr3 sft|grpo`, its dataset's test split for the histories):

    .venv/bin/python benchmarks/bench_serve.py --model runs/demo/sft/best --config configs/demo.yaml

Options: --levels 1 4 16 64 --seconds 5 (per level and round) --rounds 3 --warmup 2
--max-batch-users 16 --admit-at 0 --threads 1 (torch threads of each server worker and of the in-process
baseline) --workers 1 (the server's worker processes) --inproc-users 30 --check-users 20
--eval-records FILE --overload-clients 96 --overload-queue 8 --overload-seconds 8 --overload-timeout 5 --out result.json

What it does:
1. starts `python -m latentr3 serve` as a subprocess on a free 127.0.0.1 port (never another address);
2. in-process baseline: `Recommender.from_pretrained(model).recommend([history], k)` for one user at a
   time, median latency over --inproc-users test histories (same machine, same thread count, the
   server idle);
3. checks that the server's list equals the in-process list for --check-users histories (and, with
   --eval-records, the lists of `latentr3 eval` on the same checkpoint), timing each pair: the median
   of (HTTP latency - in-process latency) for the same history is the HTTP layer's cost per request;
4. closed loop at each concurrency c: c clients (one asyncio task each, with its own httpx client and
   keep-alive connection) each send a request, wait for its answer, send the next, for --warmup + --seconds;
   throughput and latency count the requests that complete inside the --seconds window;
   histories are the test split's, round robin.  The levels and the in-process baseline take turns
   for --rounds rounds (a shared machine's load then hits them alike); the runs of a level are pooled.
   Reported: requests/s, p50/p95/p99 latency as the client sees it (send to full answer), answers
   other than 200;
5. overload: a second server with --max-queue --overload-queue and --timeout-s --overload-timeout,
   driven by --overload-clients closed-loop clients: every request must get 200, 429 or 504 (none
   dropped, i.e. no transport error, and no other status).

"server CPU (cores)" is the server's CPU time (all its processes) over the level's wall time: on a machine
shared with other jobs it shows how much CPU the server actually got (1.0 = a whole core; one worker is at
most about one: engine thread plus event loop share the GIL).

The three bars of issue 12: rps(16) >= 5 x rps(1); p50(1) <= 1.3 x in-process latency; overload: 0
dropped, 0 answers other than 200/429/504.  The client runs on the same machine as the server: its own
CPU use is part of the numbers ("client CPU (cores)": this process's CPU time over the level's wall time;
its event loop is uvloop when installed).  Measured (README, Serving): --workers 2 5.33x, --workers 1 4.05x.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int, *args: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "latentr3", "serve", "--model", model, "--host", HOST, "--port", str(port),
           "--threads", str(threads), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://{HOST}:{port}"
    t0 = time.time()
    while time.time() - t0 < 180:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its child processes (`serve --workers`), all threads
    (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")
    return own + sum(process_cpu_seconds(int(c)) for c in children)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


async def closed_loop(url: str, histories: list[list[str]], clients: int, seconds: float, warmup: float,
                      k: int) -> dict:
    """`clients` closed-loop clients for warmup + seconds.

    Throughput and latency count the requests that complete inside the timed window (after the warmup);
    `sent`, `answered`, `dropped` and the statuses count every request, window or not (the overload check).
    """
    import httpx

    lat, window, statuses, dropped, sent = [], Counter(), Counter(), [0], [0]
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    nxt = [0]
    # one client (one keep-alive connection) per worker: a shared pool of many connections costs the
    # client more CPU per request (it runs on the same cores as the server)

    async def worker():
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as client:
            while time.perf_counter() < t_end:
                h = histories[nxt[0] % len(histories)]
                nxt[0] += 1
                sent[0] += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/recommend", json={"history": h, "k": k})
                    code = r.status_code
                    await r.aread()
                except httpx.HTTPError:
                    dropped[0] += 1
                    continue
                t1 = time.perf_counter()
                statuses[code] += 1
                if t_measure <= t1 <= t_end:
                    window[code] += 1
                    if code == 200:
                        lat.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return summarize(clients, [(seconds, lat, window, statuses, sent[0], dropped[0])])


def run_loop(coro):
    """Runs the load generator's coroutine on uvloop when installed (less client CPU per request)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def summarize(clients: int, runs: list[tuple]) -> dict:
    """Pools (seconds, latencies, window statuses, all statuses, sent, dropped) of runs at one concurrency."""
    seconds = sum(r[0] for r in runs)
    lat = [x for r in runs for x in r[1]]
    window, statuses = Counter(), Counter()
    for r in runs:
        window.update(r[2])
        statuses.update(r[3])
    ok = window.get(200, 0)
    return {"clients": clients, "window_answers": sum(window.values()), "window_ok": ok, "rps": ok / seconds,
            "p50_ms": percentile(lat, 50) * 1e3, "p95_ms": percentile(lat, 95) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "window_statuses": dict(window), "statuses": dict(statuses),
            "sent": sum(r[4] for r in runs), "answered": sum(statuses.values()), "dropped": sum(r[5] for r in runs),
            "seconds": seconds, "runs": runs}


def test_histories(args, catalogue_titles: set[str]) -> list[list[str]]:
    from latentr3.config import load_config
    from latentr3.data.dataset import load_catalogue, load_split

    cfg = load_config(args.config, args.overrides)
    cat = load_catalogue(cfg.data)
    rows = load_split(cfg.data, "test", cat)
    hist = [r.history_titles for r in rows if r.history_titles and set(r.history_titles) <= catalogue_titles]
    if not hist:
        raise SystemExit("no test history whose titles are all in the checkpoint's catalogue")
    return hist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="config naming the dataset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.dir=...)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per level and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all levels (interleaved)")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each timed run")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-batch-users", type=int, default=16)
    p.add_argument("--admit-at", type=int, default=0, help="the server's --admit-at (0 = its default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="the server's --workers (processes sharing the port)")
    p.add_argument("--inproc-users", type=int, default=30)
    p.add_argument("--check-users", type=int, default=20)
    p.add_argument("--overload-clients", type=int, default=96)
    p.add_argument("--overload-queue", type=int, default=8)
    p.add_argument("--overload-seconds", type=float, default=8.0)
    p.add_argument("--overload-timeout", type=float, default=5.0)
    p.add_argument("--eval-records", help="recommendations.jsonl of `latentr3 eval` on this checkpoint: the "
                   "server's lists must equal its lists")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()

    import httpx
    import torch

    from latentr3.recommend import Recommender

    torch.set_num_threads(args.threads)
    rec = Recommender.from_pretrained(args.model, device="cpu")
    histories = test_histories(args, set(rec.catalogue.titles))
    print(f"{len(histories)} test histories; checkpoint {args.model}; torch threads {args.threads}; "
          f"server workers {args.workers}, max_batch_users {args.max_batch_users}, admit_at {args.admit_at}",
          flush=True)

    workers = ("--workers", str(args.workers))
    proc, url = start_server(args.model, args.threads, "--max-batch-users", str(args.max_batch_users),
                             "--admit-at", str(args.admit_at), "--max-queue", "1024", "--timeout-s", "120", *workers)
    result: dict = {"model": args.model, "threads": args.threads, "workers": args.workers,
                    "max_batch_users": args.max_batch_users, "admit_at": args.admit_at}
    try:
        rec.recommend([histories[0]], k=args.k)                      # warm-up
        # the server's lists equal the in-process ones
        same, paired = 0, []
        with httpx.Client(base_url=url, timeout=60) as client:
            for h in histories[: args.check_users]:
                t0 = time.perf_counter()
                (want,) = rec.recommend([h], k=args.k)
                t1 = time.perf_counter()
                got = client.post("/v1/recommend", json={"history": h, "k": args.k}).json()["items"]
                paired.append((time.perf_counter() - t1) - (t1 - t0))
                same += [g["title"] for g in got] == [w.title for w in want]
        result["lists_equal"] = f"{same}/{min(args.check_users, len(histories))}"
        result["http_overhead_ms"] = statistics.median(paired) * 1e3
        print(f"server list == in-process list: {result['lists_equal']}; one request over HTTP minus the same "
              f"history in-process (paired, median): {result['http_overhead_ms']:.1f} ms", flush=True)
        if args.eval_records:       # ... and the lists `latentr3 eval` wrote for the same checkpoint
            recs = [json.loads(line) for line in Path(args.eval_records).read_text().splitlines()]
            recs = recs[: args.check_users]
            same = sum([g["title"] for g in httpx.post(url + "/v1/recommend", json={"history": r["history"],
                        "k": len(r["predicted"])}, timeout=60).json()["items"]] == r["predicted"] for r in recs)
            result["eval_lists_equal"] = f"{same}/{len(recs)}"
            print(f"server list == `latentr3 eval` list: {result['eval_lists_equal']}", flush=True)
        # Rounds: the in-process baseline (server idle) and every level in turn, so that a change in
        # the machine's load (a shared machine) hits all of them alike.
        inproc, runs = [], {c: [] for c in args.levels}
        cpu_share, client_share = {c: [] for c in args.levels}, {c: [] for c in args.levels}
        per_round = max(1, args.inproc_users // args.rounds)
        for rnd in range(args.rounds):
            for h in histories[rnd * per_round: (rnd + 1) * per_round]:
                t0 = time.perf_counter()
                rec.recommend([h], k=args.k)
                inproc.append(time.perf_counter() - t0)
            for c in args.levels:
                cpu0, mine0, t0 = process_cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                r = run_loop(closed_loop(url, histories, c, args.seconds, args.warmup, args.k))
                wall = time.perf_counter() - t0
                cpu_share[c].append((process_cpu_seconds(proc.pid) - cpu0) / wall)
                client_share[c].append((time.process_time() - mine0) / wall)
                runs[c] += r["runs"]
                print(f"  round {rnd + 1} concurrency {c:>3}: {r['rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"statuses {r['statuses']}, dropped {r['dropped']}", flush=True)
        result["inproc_ms"] = statistics.median(inproc) * 1e3
        print(f"in-process Recommender.recommend, one user: median {result['inproc_ms']:.1f} ms "
              f"over {len(inproc)} users", flush=True)
        levels = [summarize(c, runs[c]) for c in args.levels]
        for r in levels:
            del r["runs"]
            r["server_cpu_share"] = statistics.mean(cpu_share[r["clients"]])
            r["client_cpu_share"] = statistics.mean(client_share[r["clients"]])
        result["levels"] = levels
    finally:
        result["main_exit"] = stop_server(proc)

    proc, url = start_server(args.model, args.threads, "--max-batch-users", str(args.max_batch_users),
                             "--admit-at", str(args.admit_at), "--max-queue", str(args.overload_queue),
                             "--timeout-s", str(args.overload_timeout), *workers)
    try:
        over = run_loop(closed_loop(url, histories, args.overload_clients, args.overload_seconds, 0.0, args.k))
        del over["runs"]
    finally:
        result["overload_exit"] = stop_server(proc)
    bad = {s: n for s, n in over["statuses"].items() if s not in (200, 429, 504)}
    result["overload"] = {**over, "other_statuses": bad}

    by_c = {r["clients"]: r for r in levels}
    print("\n| concurrency | requests/s | p50 ms | p95 ms | p99 ms | answers | non-200 | server CPU (cores) "
          "| client CPU (cores) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        non200 = r["window_answers"] - r["window_ok"]
        print(f"| {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['window_answers']} | {non200} | {r['server_cpu_share']:.2f} | {r['client_cpu_share']:.2f} |")
    print(f"\nin-process recommend (one user): {result['inproc_ms']:.1f} ms median; HTTP overhead per request "
          f"(paired): {result['http_overhead_ms']:.1f} ms")
    print(f"overload ({args.overload_clients} clients, max_queue {args.overload_queue}, timeout "
          f"{args.overload_timeout}s): sent {over['sent']}, answered {over['answered']} {over['statuses']}, "
          f"dropped {over['dropped']}, other statuses {bad}")
    bars = {}
    if 1 in by_c and 16 in by_c:
        bars["rps16_over_rps1"] = by_c[16]["rps"] / by_c[1]["rps"]
        print(f"bar: rps(16) / rps(1) = {bars['rps16_over_rps1']:.2f} (>= 5)")
    if 1 in by_c:
        bars["p50_c1_over_inproc"] = by_c[1]["p50_ms"] / result["inproc_ms"]
        print(f"bar: p50(1) / in-process = {bars['p50_c1_over_inproc']:.2f} (<= 1.3)")
    bars["overload_ok"] = over["dropped"] == 0 and not bad and over["answered"] == over["sent"]
    print(f"bar: overload 0 dropped, 0 other statuses: {bars['overload_ok']}")
    print(f"server exit codes after SIGTERM: {result['main_exit']}, {result['overload_exit']}")
    result["bars"] = bars
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
