"""Tests of latent GRPO (latentr3.training.grpo, latentr3.training.advantages) on tiny random models."""
from __future__ import annotations

import importlib.util
import math
import random
import traceback
from pathlib import Path

import pytest
import torch

from latentr3.config import Config, GRPOConfig, ModelConfig
from latentr3.data.dataset import collate, tokenize_samples
from latentr3.data.prompts import PromptBuilder
from latentr3.data.splits import read_catalogue, read_split, write_catalogue, write_split
from latentr3.model.build import build_model
from latentr3.model import latent_rollout as LR
from latentr3.model.latent_lm import LatentR3Model
from latentr3.training import advantages as A
from latentr3.training import grpo
from latentr3.training.common import adamw

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures
def make_data(root: Path, n_items: int = 24, n_train: int = 24, seed: int = 0) -> Path:
    """A tiny dataset: catalogue + train/valid/test splits of random histories."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    titles = [f"Album {chr(65 + i % 26)}{i}" for i in range(n_items)]
    write_catalogue(root / "info.txt", range(n_items), titles)

    def rows(n):
        out = []
        for _ in range(n):
            hist = rng.sample(range(n_items), rng.randint(1, 4))
            tgt = rng.randrange(n_items)
            out.append({"history_item_id": hist, "item_id": tgt,
                        "history_item_title": [titles[i] for i in hist], "item_title": titles[tgt]})
        return out

    write_split(root / "train.csv", rows(n_train))
    write_split(root / "valid.csv", rows(8))
    write_split(root / "test.csv", rows(8))
    return root


def make_checkpoint(root: Path, data: Path, num_latent: int = 1, hidden: int = 32) -> Path:
    """A tiny untrained LatentR3 "SFT" checkpoint as sft.py writes it."""
    cat = read_catalogue(data / "info.txt")
    mcfg = ModelConfig(backbone="tiny", tiny_hidden=hidden, tiny_layers=1, tiny_heads=2, tiny_vocab=300,
                       num_latent=num_latent, latent_init="torch")  # the scales below were tuned for it
    torch.manual_seed(0)
    model, tok = build_model(mcfg, cat.titles, "albums")
    meta = {"backbone": "tiny", "item_noun": "albums", "template": "short", "cutoff_len": 128}
    ckpt = root / "sft"
    model.save_pretrained(ckpt, tok, meta)
    return ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    data = make_data(root / "data")
    ckpt = make_checkpoint(root, data)
    return root, data, ckpt


def load(ckpt, seed=0):
    model, tok, meta = LatentR3Model.from_pretrained(ckpt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.latent_ratt.parameters():
        p.requires_grad_(True)
    builder = PromptBuilder(tok, meta["template"], meta["item_noun"], meta["cutoff_len"], model.num_latent)
    return model, tok, builder


def a_batch(data: Path, builder, tok, n: int = 4, start: int = 0) -> dict:
    rows = read_split(data / "train.csv")[start:start + n]
    return collate(tokenize_samples(rows, builder), tok.pad_token_id)


def noise_for(model, P, G, std=1.0, seed=0):
    return grpo.draw_noise(seed, 0, P, G, model.num_latent, model.latent_ratt.hidden_size, std)


class _OneProcess:
    """The few Accelerator members grpo_step uses, for one process."""

    num_processes, process_index = 1, 0

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t


def make_config(root: Path, data: Path, ckpt: Path, out: str, **grpo_kw) -> Config:
    cfg = Config()
    cfg.data.dir = str(data)
    cfg.data.item_noun = "albums"
    cfg.model.dtype = "float32"
    kw = dict(init=str(ckpt), output_dir=str(root / out), num_generations=4, noise_std=1.0,
              batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=0, scheduler="constant",
              eval_steps=0, max_steps=4, save_steps=100, log_steps=1)
    kw.update(grpo_kw)
    cfg.grpo = GRPOConfig(**kw)
    return cfg


# ------------------------------------------------------------------------------------------ rewards
def test_perplexity_reward_hand_computed():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.1), -7.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # row 0: mean NLL = (ln 2 + ln 4) / 2 = 1.5 ln 2 -> ppl = 2^1.5; row 1: ppl = 10
    got = LR.perplexity_reward(logp, mask)
    assert torch.allclose(got, torch.tensor([-(2 ** 1.5), -10.0]))


# ------------------------------------------------------------------------------------------ advantages
def test_batch_rule_hand_computed():
    s = torch.tensor([[-2.0, -1.0], [-4.0, -5.0]])
    # s_bar = mean(-2, -4) = -3 (noise-free only); centred = [[1, 2], [-1, -2]]; norm = sqrt(10)
    want = torch.tensor([[1.0, 2.0], [-1.0, -2.0]]) / math.sqrt(10)
    assert torch.allclose(A.batch_relative_advantage(s), want)
    assert torch.allclose(A.compute_advantages("batch", s), want)
    # all rewards equal -> zeros, not NaN
    assert torch.equal(A.batch_relative_advantage(torch.full((2, 3), -1.5)), torch.zeros(2, 3))


def test_group_rule_hand_computed():
    s = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # row 0: mean 2, population std 1 -> [-1, 1] / (1 + eps); row 1: all equal -> 0
    want = torch.tensor([[-1.0 / 1.0001, 1.0 / 1.0001], [0.0, 0.0]])
    assert torch.allclose(A.group_advantage(s), want)


def test_popularity_group_rule_hand_computed():
    s = torch.tensor([[1.0, 3.0], [5.0, 7.0], [0.0, 0.0]])
    groups = torch.tensor([0, 0, 1])
    # group 0: samples 1,3,5,7 -> mean 4, population std sqrt(5); group 1: all 0 -> z 0
    z = torch.tensor([[-3.0, -1.0], [1.0, 3.0], [0.0, 0.0]]) / (math.sqrt(5) + 1e-4)
    z[2] = 0.0
    # batch: s_bar = mean(1, 5, 0) = 2; centred [[-1, 1], [3, 5], [-2, -2]]; norm sqrt(44)
    b = torch.tensor([[-1.0, 1.0], [3.0, 5.0], [-2.0, -2.0]]) / math.sqrt(44)
    w = 0.8
    got = A.popularity_group_advantage(s, groups, w)
    assert torch.allclose(got, w * z + (1 - w) * b, atol=1e-6)
    assert torch.allclose(A.compute_advantages("popularity_group", s, groups, w), got)
    with pytest.raises(ValueError):
        A.compute_advantages("nope", s)


def test_micro_step_scope_hand_computed():
    """advantage_scope micro_step: the batch rule inside each chunk of micro_step_prompts prompts (the
    authors' 2 GPUs x 1 prompt per micro-step), not over the whole optimizer batch."""
    s = torch.tensor([[-2.0, -1.0], [-4.0, -5.0], [-1.0, -1.0], [-3.0, -2.0]])
    # chunk 1 (rows 0, 1): s_bar = -3, centred [[1, 2], [-1, -2]], norm sqrt(10)
    # chunk 2 (rows 2, 3): s_bar = -2, centred [[1, 1], [-1, 0]], norm sqrt(3)
    want = torch.cat([torch.tensor([[1.0, 2.0], [-1.0, -2.0]]) / math.sqrt(10),
                      torch.tensor([[1.0, 1.0], [-1.0, 0.0]]) / math.sqrt(3)])
    assert torch.allclose(A.compute_advantages("batch", s, scope_prompts=2), want)
    # batch scope: s_bar = mean(-2, -4, -1, -3) = -2.5 over all four prompts
    c = s + 2.5
    assert torch.allclose(A.compute_advantages("batch", s), c / c.pow(2).sum().sqrt())
    assert torch.allclose(A.compute_advantages("batch", s, scope_prompts=4), c / c.pow(2).sum().sqrt())
    with pytest.raises(ValueError, match="micro_step_prompts"):
        A.compute_advantages("batch", s, scope_prompts=3)
    # the config key, through grpo_step's resolution
    g = GRPOConfig(advantage_scope="micro_step", micro_step_prompts=2, batch_size=32)
    assert grpo.scope_prompts(g) == 2 and grpo.scope_prompts(GRPOConfig()) == 0
    with pytest.raises(ValueError, match="grpo.micro_step_prompts"):
        grpo.scope_prompts(GRPOConfig(advantage_scope="micro_step", micro_step_prompts=3, batch_size=32))
    with pytest.raises(ValueError, match="grpo.advantage_scope"):
        grpo.scope_prompts(GRPOConfig(advantage_scope="step"))


def test_pooled_zscore_rule_hand_computed():
    s = torch.tensor([[-2.0, -1.0], [-4.0, -5.0]])
    # all four samples: mean -3, population std sqrt(10 / 4); batch: s_bar -3, norm sqrt(10)
    z = torch.tensor([[1.0, 2.0], [-1.0, -2.0]]) / (math.sqrt(2.5) + 1e-4)
    b = torch.tensor([[1.0, 2.0], [-1.0, -2.0]]) / math.sqrt(10)
    got = A.compute_advantages("pooled_zscore", s, popularity_weight=0.8)
    assert torch.allclose(got, 0.8 * z + 0.2 * b, atol=1e-6)
    # under the micro-step scope: each chunk on its own
    s2 = torch.cat([s, s * 2])
    got2 = A.compute_advantages("pooled_zscore", s2, popularity_weight=0.8, scope_prompts=2)
    assert torch.allclose(got2[:2], got, atol=1e-6)
    assert torch.allclose(got2[2:], A.pooled_zscore_advantage(s * 2, 0.8), atol=1e-6)


def test_grpo_step_uses_the_micro_step_scope(setup):
    _, data, ckpt = setup
    model, tok, builder = load(ckpt)
    batch = a_batch(data, builder, tok, n=4)
    g = GRPOConfig(num_generations=4, noise_std=0.5, lr=0.0, batch_size=4, micro_batch_size=2,
                   advantage_scope="micro_step", micro_step_prompts=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    noise = grpo.draw_noise(1, 0, 4, 4, 1, model.latent_ratt.hidden_size, g.noise_std)
    st = grpo.grpo_step(model, opt, sched, _split(batch, 2), noise, g, _OneProcess())
    r = st["rewards"]
    want = torch.cat([A.batch_relative_advantage(r[:2]), A.batch_relative_advantage(r[2:])])
    assert torch.allclose(st["advantages"], want, atol=1e-6)
    assert not torch.allclose(st["advantages"], A.batch_relative_advantage(r), atol=1e-3)


def test_popularity_groups_from_training_frequencies():
    hist = [[1, 2], [2], [3], [1, 2, 3]]
    tg = [2, 3, 4, 1]
    freq = A.item_frequencies(hist, tg)
    assert freq == {1: 3, 2: 4, 3: 3, 4: 1}
    scores = A.popularity_scores(hist, freq)
    assert scores.tolist() == [7.0, 4.0, 3.0, 10.0]
    thr = A.popularity_thresholds(scores, 3)
    assert torch.allclose(thr, torch.quantile(scores, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)))
    assert A.popularity_groups(scores, thr).tolist() == [1, 0, 0, 2]


# ------------------------------------------------------------------------------------------ rollouts
def test_first_sample_noise_free_and_noise_reused(setup):
    root, data, ckpt = setup
    model, tok, builder = load(ckpt)
    G = 4
    batch = a_batch(data, builder, tok)
    noise = noise_for(model, 4, G)
    assert torch.all(noise[:, 0] == 0) and torch.all(noise[:, 1:].abs().sum(-1) > 0)
    ro = grpo.rollout(model, batch, noise, G)
    # noise-free sample == the plain single-pass model
    plain = model(batch["prompt_ids"], batch["prompt_mask"], batch["target_ids"], batch["target_mask"])
    assert torch.allclose(ro.old_logprobs.view(4, G, -1)[:, 0] * batch["target_mask"], plain, atol=1e-5)
    # rewards bound to samples by index: recompute each sample alone with its own noise
    for p in (0, 2):
        for k in (1, 3):
            one = {key: v[p:p + 1] for key, v in batch.items()}
            lp = model(one["prompt_ids"], one["prompt_mask"], one["target_ids"], one["target_mask"],
                       noise=noise[p, k][None])
            r = LR.perplexity_reward(lp, one["target_mask"])
            assert torch.allclose(r, ro.rewards[p, k:k + 1], rtol=1e-5)
    # the loss pass uses the stored noise: at theta_old the ratio is 1 (kept and recomputed prompt pass)
    ro.advantages = torch.ones(4 * G)
    for keep in (True, False):
        r2 = grpo.rollout(model, batch, noise, G, keep_prefix=keep)
        r2.advantages = torch.ones(4 * G)
        logp = grpo.sample_logprobs(model, model.prefill(batch["prompt_ids"], batch["prompt_mask"]), G,
                                    r2.noise, batch["target_ids"])
        ratio = torch.exp(logp - r2.old_logprobs)[r2.target_mask.bool()]
        assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
        loss, st = grpo.policy_loss(model, r2, G, 0.2, 0.28)
        assert st["clipped_tokens"] == 0
        # with A = 1 and ratio = 1 the loss is -1 (token mean, then sequence mean)
        assert abs(loss.item() + 1.0) < 1e-5


def test_grouped_think_matches_model_think(setup):
    root, data, _ = setup
    ckpt = make_checkpoint(root / "two", data, num_latent=2)
    model, tok, builder = load(ckpt)
    G = 3
    batch = a_batch(data, builder, tok, n=3)
    noise = noise_for(model, 3, G).reshape(9, 2, -1)
    ours = grpo.sample_logprobs(model, model.prefill(batch["prompt_ids"], batch["prompt_mask"]), G, noise,
                                batch["target_ids"])
    p = model.think(model.prefill(batch["prompt_ids"], batch["prompt_mask"]).repeat_interleave(G), noise)
    ref = model.target_logprobs(p, batch["target_ids"].repeat_interleave(G, 0))
    m = batch["target_mask"].repeat_interleave(G, 0).bool()
    assert torch.allclose(ours[m], ref[m], atol=1e-5)


def test_fork_prefix_leaves_original_intact(setup):
    _, data, ckpt = setup
    model, tok, builder = load(ckpt)
    batch = a_batch(data, builder, tok)
    with torch.no_grad():
        pre = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
        keys = [layer.keys.clone() for layer in pre.cache.layers]
        a = grpo.sample_logprobs(model, grpo.fork_prefix(pre), 2, noise_for(model, 4, 2).reshape(8, 1, -1),
                                 batch["target_ids"])
        b = grpo.sample_logprobs(model, grpo.fork_prefix(pre), 2, noise_for(model, 4, 2).reshape(8, 1, -1),
                                 batch["target_ids"])
    assert torch.equal(a, b)
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, pre.cache.layers))


# ------------------------------------------------------------------------------------------ the step
def _step(model, batch, noise, g, micro=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=g.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    mbs = micro or [batch]
    return grpo.grpo_step(model, opt, sched, mbs, noise, g, _OneProcess())


def _split(batch, size):
    n = batch["prompt_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def test_micro_batch_invariance_and_only_latent_ratt_trains(setup):
    _, data, ckpt = setup
    g = GRPOConfig(num_generations=4, lr=0.05, advantage="batch")
    results = []
    for size in (4, 2, 1):
        model, tok, builder = load(ckpt)
        before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
        batch = a_batch(data, builder, tok)
        # trim each micro-batch's padding the way the collator would (shapes differ, results may not)
        micro = [collate(tokenize_samples(read_split(data / "train.csv")[i:i + size], builder),
                         tok.pad_token_id) for i in range(0, 4, size)]
        st = _step(model, batch, noise_for(model, 4, 4), g, micro)
        for n, p in model.backbone.named_parameters():
            assert p.grad is None and torch.equal(p, before[n]), n
        results.append((st["advantages"], {n: p.detach().clone() for n, p in model.latent_ratt.named_parameters()}))
    adv0, w0 = results[0]
    assert not torch.allclose(w0["q_proj.weight"], load(ckpt)[0].latent_ratt.q_proj.weight)
    # fp32 with different padded shapes per micro-batch size: the rewards (perplexities in the
    # hundreds on this random model) agree to ~1e-7 relative, so the advantages to ~1e-5 absolute
    for adv, w in results[1:]:
        assert torch.allclose(adv, adv0, atol=2e-5), (adv - adv0).abs().max()
        for n in w0:
            assert torch.allclose(w[n], w0[n], atol=1e-5), (n, (w[n] - w0[n]).abs().max())


def test_a_few_steps_raise_the_reward(setup):
    # A random tiny backbone barely depends on the latent, so the gain is small but systematic; noise of
    # the latent's own scale (0.1 per dimension) and Adam at 3e-3 improve it steadily for ~6 steps.
    _, data, ckpt = setup
    torch.manual_seed(0)
    model, tok, builder = load(ckpt)
    batch = a_batch(data, builder, tok, n=8)
    g = GRPOConfig(num_generations=8, noise_std=0.1, lr=3e-3, advantage="batch", max_grad_norm=10.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=g.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    nf, mean = [], []
    for step in range(5):
        noise = grpo.draw_noise(1, step, 8, 8, 1, model.latent_ratt.hidden_size, g.noise_std)
        st = grpo.grpo_step(model, opt, sched, _split(batch, 4), noise, g, _OneProcess())
        nf.append(st["reward_noise_free"])
        mean.append(st["reward_mean"])
    assert all(b > a for a, b in zip(nf, nf[1:])), nf
    assert nf[-1] > nf[0] + 2.0 and mean[-1] > mean[0] + 2.0, (nf, mean)


def test_single_pass_step_matches_reference_step(setup):
    bench = _load_bench()
    _, data, ckpt = setup
    G = 4
    g = GRPOConfig(num_generations=G, noise_std=1.0)
    grads = []
    losses = []
    for impl in ("reference", "ours", "ours, rollout as the loss pass"):
        model, tok, builder = load(ckpt)
        batch = a_batch(data, builder, tok)
        noise = noise_for(model, 4, G)
        if impl == "reference":
            loss = bench.reference_loss(model, batch, noise, G, g)
        else:
            ro = (grpo.rollout(model, batch, noise, G) if impl == "ours"
                  else grpo.rollout_with_graph(model, batch, noise, G))
            ro.advantages = A.compute_advantages("batch", ro.rewards).reshape(-1)
            loss, _ = grpo.policy_loss(model, ro, G, g.clip_eps_low, g.clip_eps_high)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.latent_ratt.named_parameters()})
    for other in (1, 2):
        assert math.isclose(losses[0], losses[other], rel_tol=1e-4, abs_tol=1e-7)
        for n in grads[0]:
            assert torch.allclose(grads[0][n], grads[other][n], rtol=1e-3, atol=1e-7), n


def test_single_pass_step_equals_two_pass_step(setup):
    _, data, ckpt = setup
    weights, stats = [], []
    for single in (True, False):
        model, tok, builder = load(ckpt)
        g = GRPOConfig(num_generations=4, lr=0.05, single_pass=single)
        micro = _split(a_batch(data, builder, tok), 2)
        stats.append(_step(model, a_batch(data, builder, tok), noise_for(model, 4, 4), g, micro))
        weights.append({n: p.detach().clone() for n, p in model.latent_ratt.named_parameters()})
    assert torch.allclose(stats[0]["rewards"], stats[1]["rewards"], atol=1e-6)
    assert stats[0]["clip_fraction"] == stats[1]["clip_fraction"] == 0.0
    for n in weights[0]:
        assert torch.allclose(weights[0][n], weights[1][n], atol=1e-6), n


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_grpo", REPO / "benchmarks" / "bench_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ the recipe
def _ratt(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "latent_ratt.safetensors"))


def test_train_resume_matches_uninterrupted(setup):
    root, data, ckpt = setup
    full = grpo.train_grpo(make_config(root, data, ckpt, "full"))
    assert (root / "full" / "last" / "latentr3.json").exists() and (full / "latentr3.json").exists()
    cfg = make_config(root, data, ckpt, "halted", halt_after_steps=2)
    grpo.train_grpo(cfg)
    assert not (root / "halted" / "last").exists()
    cfg.grpo.halt_after_steps = 0
    grpo.train_grpo(cfg)
    a, b = _ratt(root / "full" / "last"), _ratt(root / "halted" / "last")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert not torch.allclose(a["q_proj.weight"], _ratt(ckpt)["q_proj.weight"])
    import json

    recs = [json.loads(x) for x in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward_std", "reward_noise_free", "adv_mean", "adv_std", "adv_min", "adv_max",
                "adv_zero_share", "clip_fraction", "grad_norm", "lr"):
        assert key in steps[0]
    # a reloaded GRPO checkpoint is a normal LatentR3 checkpoint
    LatentR3Model.from_pretrained(root / "full" / "last")


def test_train_popularity_rule_with_kl_and_recompute(setup):
    root, data, ckpt = setup
    cfg = make_config(root, data, ckpt, "pop", advantage="popularity_group", beta=0.1,
                      prefix_cache="recompute", num_iterations=2, max_steps=2)
    grpo.train_grpo(cfg)
    import json

    recs = [json.loads(x) for x in (root / "pop" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward_mean" in r]
    assert len(steps) == 2 and "kl" in steps[-1] and math.isfinite(steps[-1]["loss"])
    assert any("valid_ndcg10" in r for r in recs) or importlib.util.find_spec("latentr3.evaluation.evaluate") is None


def test_train_with_lora_reloads(setup):
    root, data, ckpt = setup
    grpo.train_grpo(make_config(root, data, ckpt, "lora", lora=True, max_steps=1))
    model, _, meta = LatentR3Model.from_pretrained(root / "lora" / "last")
    assert meta["lora"] and hasattr(model.backbone, "peft_config")


# ------------------------------------------------------------------------------------------ sweep
def test_sweep_picks_by_validation_and_skips_done_points(setup, capsys):
    from latentr3.training.sweep import parse_grid, run_sweep

    root, data, ckpt = setup
    cfg = make_config(root, data, ckpt, "sweep_run", max_steps=2, eval_sample=8)
    grid = parse_grid(["grpo.lr=1e-4,5e-2"])
    assert [float(v) for v in grid["grpo.lr"]] == [1e-4, 5e-2]
    out = run_sweep(cfg, grid, "grpo")
    scores = [r["valid_score"] for r in out["rows"]]
    assert len(scores) == 2 and all(s is not None for s in scores)
    assert scores == sorted(scores, reverse=True)            # best validation NDCG@10 first
    assert out["selected"]["valid_score"] == max(scores)
    printed = capsys.readouterr().out
    assert "(selected)" in printed and "σ√d / ‖r‖" in printed
    d = load(ckpt)[0].latent_ratt.hidden_size
    for r in out["rows"]:     # the noise's size against the latent's, from the point's own validation log
        assert r["latent_norm"] > 0
        assert r["noise_to_latent"] == pytest.approx(cfg.grpo.noise_std * d ** 0.5 / r["latent_norm"])
    done = Path(out["selected"]["checkpoint"]).parent / "done.json"
    stamp = done.stat().st_mtime_ns
    run_sweep(cfg, grid, "grpo")                              # finished points are not retrained
    assert done.stat().st_mtime_ns == stamp


def test_grouped_samples_match_the_repeated_cache_path_and_its_gradients(setup):
    """The grouped path (the G samples as queries over the prompt's KV, kept once) gives the generic
    path's log-probs and LatentRATT gradients; prompts of different lengths (left padding) included."""
    _, data, ckpt = setup
    model, tok, builder = load(ckpt)


    G = 4
    batch = a_batch(data, builder, tok, n=4)
    assert batch["prompt_mask"].min() == 0, "the batch should have left padding"
    noise = noise_for(model, 4, G).reshape(4 * G, 1, -1)
    m = batch["target_mask"].repeat_interleave(G, 0).bool()
    out, grads = {}, {}
    for grouped in (True, False):
        with torch.no_grad():
            pre = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
        assert LR.grouped_applies(model, pre)
        logp = LR.sample_logprobs(model, pre, G, noise, batch["target_ids"], grouped=grouped)
        model.zero_grad(set_to_none=True)
        ((logp * m).sum() / m.sum()).backward()
        out[grouped] = logp.detach()
        grads[grouped] = [p.grad.clone() for p in model.latent_ratt.parameters()]
    assert torch.allclose(out[True][m], out[False][m], atol=2e-5)
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    # the grouped path reads the prompt pass without consuming it
    with torch.no_grad():
        pre = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
        a = LR.sample_logprobs(model, pre, G, noise, batch["target_ids"], grouped=True)
        b = LR.sample_logprobs(model, pre, G, noise, batch["target_ids"], grouped=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("single_pass", [True, False])
def test_shared_instruction_prefill_gives_the_same_step(setup, single_pass):
    """grpo.share_prompt_prefix: the template's instruction prefilled once, the prompts cut after it; the
    rewards, advantages and updated LatentRATT equal the step on the full prompts."""
    _, data, ckpt = setup
    g = GRPOConfig(num_generations=4, lr=0.05, advantage="batch", single_pass=single_pass)
    out = []
    for share in (False, True):
        model, tok, builder = load(ckpt)
        examples = tokenize_samples(read_split(data / "train.csv")[:4], builder)
        shared = None
        if share:
            shared, examples = grpo.share_template_prefix(model, builder.template_prefix(), examples)
            assert shared is not None and shared.attention_mask.shape[1] >= 3
        batch = collate(examples, tok.pad_token_id)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=g.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        st = grpo.grpo_step(model, opt, sched, _split(batch, 2), noise_for(model, 4, 4), g, _OneProcess(),
                            shared=shared)
        out.append((st["rewards"], st["advantages"], model.latent_ratt.q_proj.weight.detach().clone()))
    (r0, a0, w0), (r1, a1, w1) = out
    assert torch.allclose(r1, r0, rtol=1e-5) and torch.allclose(a1, a0, atol=2e-5)
    assert torch.allclose(w1, w0, atol=1e-5)
    # a prompt that does not start with the prefix: nothing is shared, the examples are unchanged
    model, tok, builder = load(ckpt)
    examples = tokenize_samples(read_split(data / "train.csv")[:2], builder)
    odd = [examples[0], grpo.Example(examples[1].prompt[1:], examples[1].target, 1)]
    assert grpo.share_template_prefix(model, builder.template_prefix(), odd) == (None, odd)


def test_prompt_pass_without_lm_head_keeps_kv_and_hidden(setup):
    """GRPO's prompt pass skips the LM head where the grouped path runs: the same hidden states and KV
    as the full prefill, no last logits, and the same sample log-probs."""
    _, data, ckpt = setup
    model, tok, builder = load(ckpt)
    batch = a_batch(data, builder, tok, n=3)
    full = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
    lean = LR.prompt_pass(model, batch)
    assert LR.grouped_applies(model) and lean.last_logits is None and full.last_logits is not None
    assert torch.equal(lean.hidden, full.hidden)
    for a, b in zip(lean.cache.layers, full.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    noise = noise_for(model, 3, 4).reshape(12, 1, -1)
    torch.testing.assert_close(LR.sample_logprobs(model, lean, 4, noise, batch["target_ids"]),
                               LR.sample_logprobs(model, full, 4, noise, batch["target_ids"]))


def test_grpo_step_reads_back_from_the_device_once(setup, monkeypatch):
    """The step's statistics are read back in one transfer (on a GPU every .item() / float() of a tensor
    stalls the host until the device is idle); the numbers are those of the rewards and advantages."""
    _, data, ckpt = setup
    model, tok, builder = load(ckpt)
    batch = a_batch(data, builder, tok, n=4)
    g = GRPOConfig(num_generations=4, noise_std=0.5, lr=1e-3, batch_size=4, micro_batch_size=2)
    opt = adamw([p for p in model.parameters() if p.requires_grad], 1e-3, 0.0)   # as train_grpo (fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    noise = grpo.draw_noise(1, 0, 4, 4, 1, model.latent_ratt.hidden_size, g.noise_std)
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append(
            (_n, traceback.extract_stack(limit=2)[0][:2])), _o(self, *a, **k))[1])
    st = grpo.grpo_step(model, opt, sched, _split(batch, 2), noise, g, _OneProcess())
    monkeypatch.undo()
    ours = [(n, f, line) for n, (f, line) in reads if "/latentr3/" in f]
    assert [n for n, *_ in ours] == ["tolist"], ours   # transformers' own mask code reads the padding
    r, a = st["rewards"].double(), st["advantages"].double()
    assert st["reward_mean"] == pytest.approx(float(r.mean())) and st["adv_max"] == pytest.approx(float(a.max()))
    assert st["reward_noise_free"] == pytest.approx(float(r[:, 0].mean())) and 0 <= st["clip_fraction"] <= 1
    assert st["grad_norm"] > 0 and "kl" not in st
