"""Catalogue-constrained beam search on the shared prompt KV cache.

Written by hand because no maintained decoder does this efficiently: Hugging Face `generate` with a
`prefix_allowed_tokens_fn` calls Python once per beam per step and the reference hashes token prefixes
into a dict.  Here every step is a handful of tensor operations over all beams of all users:

* the token prefix every prompt shares (the template's instruction) is prefilled once for all users;
  each user's prompt is prefilled once after it and the latent thought(s) computed once;
* the beams share that prompt KV (kept once per user, never repeated K times): each step's attention
  (`decoder_step.attend_beams`, one fused SDPA call per layer) lets the K beams of a user read it and
  their own generated KV, written once in place (no torch.cat per step) and never moved: a beam
  reorder changes which earlier tokens each beam may read (its ancestry), not the KV;
* beam steps run through `decoder_step.LlamaFamilyStep` (the backbone's own modules without HF's
  per-call model plumbing) when the backbone is a Llama-family decoder, else through the backbone's
  forward with `attend_beams` switched in through transformers' AttentionInterface; the fast step
  runs only live beam rows (right after a user starts, 9 of its 10 beams are empty);
* the trie (CSR tensors) gives each live beam's out-edges (a dead beam sits on a leaf: no edges); the
  candidates' scores, sum + logit - logsumexp, are ranked per user over the edges alone (no
  (beams, vocab) candidate matrix); the edge gives the child node directly (no trie look-up);
* a user starts with one live beam at the root, scored from its prefill's logits;
* a candidate that takes the EOS edge reaches a leaf = a finished title; finished titles go to a
  per-user pool of the best `top_k`, the others become the next beams;
* a user is finished when its pool is full and no live beam can still beat the pool's worst entry
  (exact: scores only fall as a title grows, see `_upper_bound`), or when it has no live beam; its
  rows then leave the batch and the KV cache, and waiting users are admitted in its place
  (continuous batching, `refill`).

The search is a running batch (`BeamBatch`: `admit` / `step` / `retire`) driven by
`engine.DecodingEngine`, which owns the queue and answers each request's future when its beams finish;
`beam_search_prompts` (offline evaluation), `Recommender.recommend` and the HTTP server all go through
it.  Each request has its own top_k (<= the batch's max_top_k) and may exclude titles (for that user only,
the trie nodes with nothing but excluded titles below them are masked).

Scores are sum(log p) / length ** length_penalty, length = generated tokens including EOS
(length_penalty 1 = BIGRec / the paper, 0 = plain sum as in D3).

Two forms of the step (`eval.cuda_graphs`), same lists (tests/test_static_step.py):

* eager (`off`): every tensor is as large as that step needs (the live rows, the edges of their trie
  nodes, the slots written so far), read back to the host where convenient;
* static-shape (`on`): the live rows are padded to a bucket (a power of two, or all rows), the KV
  storage (`StaticBeamKV`) has a fixed number of user places, prompt positions and slots (the trie's
  depth), the ancestry, mask and attention cover a power-of-two bucket of slots (a prefix of that
  storage), every node's out-edges are padded to a power-of-two width above the widest node ahead, and
  the step reads nothing back except one small tensor between the selection and the forward (who
  stays, how many rows run, the widest node ahead: the stop check).  Users leave and join in place
  (the storage outlives an emptied batch).  On CUDA the forward of each (rows, slots) bucket is one CUDA graph
  (`_CUDAGraphs`), captured on first use and replayed: a small-batch step of a 0.5B model is some 500
  kernel launches whose launch cost exceeds their run time.
The selection (scoring, top-k, pools, stop check inputs) is static-shape too, (U, K x width) for host-known
U and width, but runs uncaptured; the forward (embedding, every layer, LM head) is what a graph holds.
`auto` is the eager step on every device for now.  On CPU there is no launch cost to save and the
padding is pure extra work (bench_eval --compare-static on the shared 2-core CPU: static 0.90x the eager
users/s).  On CUDA the static step + graphs is the one meant to be chosen, but it has not yet run on a GPU
(its CPU equality tests pass; the capture and replay have not executed anywhere): until
benchmarks/device_check.sh has shown graph and eager lists identical there, a user's default must not be
an unverified path, so `on` opts in.
"""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from ..data.prompts import shared_prefix_length
from ..data.dataset import left_pad
from ..model.latent_lm import LatentR3Model
from .decoder_step import LlamaFamilyStep, attend_beams
from .engine import DecodeRequest, DecodeResult, DecodingEngine
from .trie import ItemTrie

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    titles: list[list[str]]        # per user, best first, distinct catalogue titles
    scores: list[list[float]]      # matching normalised scores
    title_index: torch.Tensor      # (B, top_k) index into trie.titles_unique, -1 where fewer were found


def _normalise(sums: torch.Tensor, length: int | torch.Tensor, length_penalty: float) -> torch.Tensor:
    if length_penalty == 0:
        return sums
    length = torch.as_tensor(length, dtype=sums.dtype, device=sums.device)
    return sums / (length if length_penalty == 1 else length ** length_penalty)


def _upper_bound(sums: torch.Tensor, max_final_len: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """The best normalised score any completion of a live beam can reach (exact, not a heuristic).

    Log-probs are <= 0, so a beam's sum s only falls; with a length penalty p > 0 a completion scores
    (s + x) / L**p with x <= 0 and L at most the deepest title below the beam's trie node, so at most
    s / max_final_len**p.
    """
    return _normalise(sums, max_final_len.to(sums.dtype), length_penalty)


_MIN_SHARED_PREFIX = 8   # shorter common prefixes are not worth a separate prefill
_SLOT_CHUNK = 16   # the generated-KV buffers grow by this many positions when a title runs longer


class BeamKV(DynamicLayer):
    """One layer's KV cache for the beams of the active users.

    Storage (places, H, P + capacity * K, D): `places` user places, the first `users` of them active; per
    user first the prompt (+ latent) positions, right-aligned in a common prompt part of P positions (the
    rest masked) and kept once per user, never repeated for the K beams; then the generated tokens,
    slot-major: the token that beam k of a user generated at the user's step s sits at P + s * K + k,
    written once and never moved.  When beams are reordered, each beam's ancestry (which beam column it
    descends from at every earlier step) changes instead of the KV: one attention call per layer
    (`attend_beams`, a fused SDPA kernel) lets the K beams of a user read its prompt and their own
    ancestors' tokens through a mask built from that ancestry (`begin_beam_step`), which also hides the
    slots a user has not written yet (users admitted at different steps have generated different
    numbers of tokens).

    Users come and go in place: joining users are written into free places (`append`), leaving users'
    places are filled by moving the last users into them (`select`: a user that leaves costs one user's
    copy, not a copy of the whole batch).  Only when more users or a longer prompt arrive than the
    storage holds is it reallocated (places grow to a power of two, so a growing batch reallocates
    log2(users) times).  Attention reads the active users' places, the prompt part and the slots written.
    `slots`: generated slots allocated at first (more are added _SLOT_CHUNK at a time when a title runs
    longer).
    """

    _prompt_multiple = 1          # the prompt part is a multiple of this many positions
    _reads_every_place = False    # attention reads the active users only

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompt_mask: torch.Tensor, beams: int,
                 slots: int = _SLOT_CHUNK):
        super().__init__()
        self.beams, self.slots, self.users = beams, slots, 0
        self.k_all = self.v_all = self.prompt_bias = None
        self.prompt_len = 0
        self.write_user = self.write_pos = self.mask = None
        self.is_initialized = True
        self.keys = self.values = None  # unused; k_all / v_all are the storage
        self.append(keys, values, prompt_mask)

    @property
    def capacity(self) -> int:
        """Generated slots the storage holds per user."""
        return (self.k_all.shape[2] - self.prompt_len) // self.beams

    @property
    def places(self) -> int:
        return self.k_all.shape[0]

    def _reallocate(self, places: int, prompt_len: int, like: torch.Tensor) -> None:
        _, H, _, D = like.shape
        K, P, slots = self.beams, prompt_len, self.capacity if self.k_all is not None else self.slots
        k = like.new_zeros(places, H, P + slots * K, D)
        v = torch.zeros_like(k)
        bias = torch.zeros(places, 1, 1, P, dtype=like.dtype, device=like.device)
        n = self.users
        if n:
            shift = P - self.prompt_len     # the prompt part grows at the front: slots keep their offset
            k[:n, :, shift:], v[:n, :, shift:] = self.k_all[:n], self.v_all[:n]
            bias[:n, ..., :shift] = NEG_INF
            bias[:n, ..., shift:] = self.prompt_bias[:n]
        self.k_all, self.v_all, self.prompt_bias, self.prompt_len = k, v, bias, P
        self.length = P + slots * K
        self.generation = next(_GENERATIONS)

    def append(self, keys: torch.Tensor, values: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Adds users (their prompt K/V (n, H, P, D), left-padded under prompt_mask (n, P)) after the active ones."""
        n, _, P, _ = keys.shape
        a, U = self.users, self.users + n
        if self.k_all is None or U > self.places or P > self.prompt_len:
            places = U if self.k_all is None else max(U, self.places)
            m = self._prompt_multiple
            self._reallocate(_bucket(places), max(-(-P // m) * m, self.prompt_len), keys)
        Pc = self.prompt_len
        self.k_all[a:U, :, Pc - P: Pc], self.v_all[a:U, :, Pc - P: Pc] = keys, values
        self.prompt_bias[a:U] = NEG_INF
        self.prompt_bias[a:U, 0, 0, Pc - P:] = torch.zeros_like(prompt_mask, dtype=keys.dtype).masked_fill_(
            ~prompt_mask.bool(), NEG_INF)
        self.users = U

    def select(self, users: torch.Tensor, moved: list[int]) -> None:
        """Keeps `users` (indices into the active users; the new user i is the old user users[i]), where
        `moved` lists the i with users[i] != i: only those places are written."""
        self.users = users.numel()
        if moved:
            dst = torch.tensor(moved, dtype=torch.long, device=users.device)
            src = users[dst]
            self.k_all[dst], self.v_all[dst] = self.k_all[src], self.v_all[src]
            self.prompt_bias[dst] = self.prompt_bias[src]

    def begin_step(self, write_user: torch.Tensor, write_pos: torch.Tensor, slots: int,
                   mask: torch.Tensor) -> None:
        """Before a step: the rows that run write their K/V at (write_user, write_pos); attention reads the
        prompt and `slots` generated slots under `mask` (U, 1, K, P + slots * K)."""
        if slots > self.capacity:
            grow = -(-(slots - self.capacity) // _SLOT_CHUNK) * _SLOT_CHUNK * self.beams
            self.k_all = F.pad(self.k_all, (0, 0, 0, grow))
            self.v_all = F.pad(self.v_all, (0, 0, 0, grow))
        self.write_user, self.write_pos, self.mask = write_user, write_pos, mask
        self.length = self.prompt_len + slots * self.beams

    def update(self, key_states, value_states, *args, **kwargs):
        """key/value_states (L, H, 1, D) of the rows that run -> the prompt + generated K/V that attention
        reads: the active users' (every place's for the static step)."""
        self.k_all[self.write_user, :, self.write_pos] = key_states[:, :, 0]
        self.v_all[self.write_user, :, self.write_pos] = value_states[:, :, 0]
        n = self.places if self._reads_every_place else self.users
        return self.k_all[:n, :, : self.length], self.v_all[:n, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.length + query_length, 0


_PROMPT_CHUNK = 32   # a static KV buffer's prompt part is a multiple of this many positions
_GENERATIONS = itertools.count()   # every (re)allocation of a BeamKV storage gets a new number


def _bucket(n: int, most: int | None = None) -> int:
    """The smallest power of two >= n, at most `most`."""
    b = 1 << max(n - 1, 0).bit_length()
    return b if most is None else min(b, most)


class StaticBeamKV(BeamKV):
    """A BeamKV for the static-shape step: its shape and address change only when it is reallocated.

    The prompt part is a multiple of _PROMPT_CHUNK positions and the generated part has `slots` slots (the
    trie's depth: a title never needs more), so a step never grows it; attention reads every place (the
    stale ones are never read by an active beam) so that the shapes depend on the places, not on the
    users.  A reallocation gives a new `generation`: CUDA graphs captured over the old storage are dropped.
    """

    _prompt_multiple = _PROMPT_CHUNK
    _reads_every_place = True


class _CUDAGraphs:
    """The static-shape forward as one CUDA graph per key (the (rows, slots) bucket), all dropped when the
    KV storage is reallocated (a new generation: the graphs hold its old addresses).

    `body(*inputs)` must be a fixed sequence of kernels for a key: inputs of fixed shapes, no host read,
    its outputs allocated inside.  The first call of a key warms up on a side stream (two real runs:
    the step only writes K/V at the positions its inputs name, so repeating it is harmless), then
    captures into a graph with static copies of the inputs; every call copies its inputs into those
    and replays.  The graphs share one memory pool (their temporaries overlap, as they never run at
    once), so the returned tensor, a graph's output buffer, is valid until the next replay of any key:
    the beam search reads a step's logits before it runs the next forward.
    """

    def __init__(self, body):
        self.body = body
        self.graphs: dict = {}
        self.generation = None
        self.failed = False
        self.pool = None

    def __call__(self, key, generation: int, *inputs: torch.Tensor) -> torch.Tensor:
        if generation != self.generation:     # the KV storage moved: graphs over the old one are stale
            self.graphs.clear()
            self.pool = None
            self.generation = generation
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.graphs[key] = self._capture(inputs)
            except RuntimeError as e:   # a capture the driver refuses: run this one uncaptured, say so
                if not self.failed:
                    warnings.warn(f"CUDA graph capture failed ({e}); these steps run without graphs")
                self.failed = True
                return self.body(*inputs)
        graph, static_inputs, out = entry
        for buf, x in zip(static_inputs, inputs):
            buf.copy_(x)
        graph.replay()
        return out

    def _capture(self, inputs):
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.body(*static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.body(*static_inputs)
        return graph, static_inputs, out


_ACTIVE_LAYERS: list | None = None   # the BeamKV layers of the search in progress (set around forwards)
_BEAM_ATTENTION = "latentr3_beam"


def _beam_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The HF-forward path's attention function: `attend_beams` behind transformers' AttentionInterface.

    query (R, Hq, 1, D); key/value (U, Hk, S, D), every user's prompt + generated K/V from `BeamKV.update`.
    """
    layer = _ACTIVE_LAYERS[module.layer_idx]
    R, Hq, _, D = query.shape
    scaling = D ** -0.5 if scaling is None else scaling
    out = attend_beams(query[:, :, 0], key, value, layer.mask, scaling)
    return out.view(R, 1, Hq, D), None


def _register_beam_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_BEAM_ATTENTION, _beam_attention)
    AttentionMaskInterface.register(_BEAM_ATTENTION, lambda *args, **kwargs: None)  # the prompt mask is ours


def begin_beam_step(cache, fed: torch.Tensor, run: torch.Tensor, lineage: torch.Tensor,
                    slots: int | None = None) -> None:
    """Prepares every BeamKV layer of `cache` for one step.

    fed (U,): tokens each user's beams have generated so far; beam k of user u writes its new token's K/V
    at slot fed[u], column k.  lineage (U, K, >= fed.max() + 1): the column of beam k's ancestor at each
    slot (its own column k at slot fed[u]).  A beam attends to its user's prompt and its ancestors'
    slots 0..fed[u].  Only the beam rows `run` (u * K + k) write.  `slots`: the mask covers that many
    slots (static-shape step: no host read of fed.max()).
    """
    layers = cache.layers
    K, P = layers[0].beams, layers[0].prompt_len
    U, device = fed.numel(), fed.device
    t = int(fed.max()) + 1 if slots is None else slots
    columns = torch.arange(K, device=device)
    written = torch.arange(t, device=device)[None, :] <= fed[:, None]                   # (U, t)
    gen_ok = (lineage[:, :, :t, None] == columns) & written[:, None, :, None]            # (U, K, t, K)
    gen_bias = torch.zeros(U, 1, K, t * K, dtype=layers[0].k_all.dtype, device=device).masked_fill_(
        ~gen_ok.view(U, 1, K, t * K), NEG_INF)
    mask = torch.cat([layers[0].prompt_bias[:U].expand(U, 1, K, P), gen_bias], -1)      # (U, 1, K, P + tK)
    user = torch.div(run, K, rounding_mode="floor")
    pos = P + fed[user] * K + (run - user * K)
    for layer in layers:
        layer.begin_step(user, pos, t, mask)


class _HFForwardStep:
    """A beam step through the backbone's own forward (any architecture whose attention goes through
    transformers' AttentionInterface): `_beam_attention` is switched in for the duration of the call."""

    def __init__(self, model: LatentR3Model):
        _register_beam_attention()
        self.model = model
        self.embed = model.backbone.get_input_embeddings()

    runs_row_subset = False  # every beam row runs (dead ones included)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, num_rows: int,
                 cache) -> torch.Tensor:
        global _ACTIVE_LAYERS
        model = self.model
        config = model.backbone.config
        saved, _ACTIVE_LAYERS = config._attn_implementation, cache.layers
        config._attn_implementation = _BEAM_ATTENTION
        try:
            logits, _, _ = model._run(self.embed(tokens[:, None]).to(model.embed_dtype), None, positions[:, None],
                                      cache, logits_to_keep=1, hidden=False)
        finally:
            config._attn_implementation, _ACTIVE_LAYERS = saved, None
        return logits[:, -1]


def _user_topk(scores: torch.Tensor, user: torch.Tensor, num_users: int, k: int):
    """Per-user top-k over a flat list of candidates grouped by user (contiguous, user-sorted).

    Returns (values (U, k), candidate index (U, k)); -inf / an arbitrary index where a user has fewer.
    """
    counts = torch.bincount(user, minlength=num_users)
    first = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()) if user.numel() else 0, k)
    mat = scores.new_full((num_users, width), NEG_INF)
    col = torch.arange(user.numel(), device=user.device) - first[user]
    mat[user, col] = scores
    val, idx = mat.topk(k, dim=1)
    return val, (first[:, None] + idx).clamp_(max=max(user.numel() - 1, 0))


class _ActiveUsers:
    """The users being decoded: per-user and per-beam-row state, compacted and extended together."""

    def __init__(self, device, width: int):
        e = torch.empty(0, dtype=torch.long, device=device)
        self.reqs: list = []      # (U,) the DecodeRequest of each active user
        self.uids = e             # (U,) their uids (keys of the excluded-title set)
        self.top_k = e            # (U,) titles each user wants (<= width)
        self.pool_scores = torch.empty(0, width, device=device)   # (U, width) best finished titles so far
        self.pool_titles = e.new_empty(0, width)                   # their titles_unique index, -1 = none
        self.nodes = e            # (R,) trie node of each beam row, R = U * K
        self.sums = None          # (U, K) sum of the beams' log-probs (+ assistant scores); -inf = dead beam
        self.fed = e              # (U,) tokens generated and fed so far (equal for a user's beams)
        self.fed_host: list = []  # the same on the host (the static step's slots bucket, without a read)
        self.lineage = None       # (U, K, slots) column of beam k's ancestor at each slot (BeamKV)
        self.base_pos = e         # (U,) position of the first generated token
        self.assistant = None     # AssistantScores of the active users (D3), or None
        self.logits = None        # (M, V') logits that score the rows' next tokens ...
        self.logit_row = e        # (R,) ... row r's are logits[logit_row[r]]
        self.cache = None         # DynamicCache whose layers are BeamKV
        self.excluded = None      # sorted uid * num_nodes + node of every trie node masked for a user, or None

    def __len__(self) -> int:
        return len(self.reqs)


class BeamBatch:
    """The constrained beam search as a running batch that users join and leave between steps.

    The batch object of `engine.DecodingEngine`: `admit(requests)` prefills the requests (after the
    shared instruction prefix when their prompt starts with it) and adds them with one live root beam
    each; `step()` runs one beam step for every active user and returns [(request, DecodeResult)] for
    the users whose search ended.  A user's search does not depend on the other users in the batch.

    num_beams K is fixed for the batch (the KV layout has K columns per user); each request asks for
    its own top_k <= max_top_k and may exclude titles (their leaves are masked for that user only).
    `assistant`, when given, maps a list of request keys to their `AssistantScores` (D3).
    `shared_prefix`: token ids most prompts start with (the template's instruction), prefilled once.
    `cuda_graphs` (auto / on / off, see the module docstring and EvalConfig.cuda_graphs): the static-shape
    step (+ CUDA graphs on CUDA) or the eager one; the static step needs `LlamaFamilyStep` (another
    backbone runs eager).
    """

    def __init__(self, model: LatentR3Model, trie: ItemTrie, pad_id: int, num_beams: int = 10,
                 max_top_k: int = 10, length_penalty: float = 1.0, assistant=None, fast_step: bool = True,
                 shared_prefix: list[int] | None = None, cuda_graphs: str = "auto"):
        if cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be 'auto', 'on' or 'off', got {cuda_graphs!r}")
        if not length_penalty >= 0:
            # With p < 0 a longer completion divides by a smaller L**p, so s / max_len**p is no upper bound
            # and the search would stop early with a wrong ranking.
            raise ValueError(f"length_penalty must be >= 0 (1: mean log-prob, 0: sum), got {length_penalty}")
        self.model, self.pad_id, self.K, self.width = model, pad_id, num_beams, max_top_k
        self.length_penalty, self.assistant_of = length_penalty, assistant
        self.device = device = model.device
        self.trie = trie if trie.row_ptr.device == device else trie.to(device)
        self.run_step = LlamaFamilyStep(model.backbone) if fast_step and LlamaFamilyStep.supports(model.backbone) \
            else _HFForwardStep(model)
        self.leaf_depth = self.trie.subtree_max_depth                      # (num_nodes,)
        # A beam with nothing left to extend sits on a leaf: a leaf has no out-edges, so no candidates.
        self.dead = int(self.trie.leaf_node_of_title[0])
        self.num_titles = len(self.trie.titles_unique)
        self._item_title = None   # (num_items,) title index of each item position, built on first use
        self.shared_tokens = list(shared_prefix) if shared_prefix and len(shared_prefix) >= _MIN_SHARED_PREFIX \
            else None
        self._shared = None
        on_cuda = device.type == "cuda" and torch.cuda.is_available()
        # "auto" stays eager until graph == eager has been checked on a GPU (module docstring)
        self.static = isinstance(self.run_step, LlamaFamilyStep) and cuda_graphs == "on"
        self.graphs = _CUDAGraphs(self._static_forward) if self.static and on_cuda else None
        self.slots = max(self.trie.max_depth, 1)     # static KV: a title has at most max_depth tokens
        self.root_degree = int(self.trie.row_ptr[1] - self.trie.row_ptr[0])
        self._static_kv = None   # static step: the StaticBeamKV cache, kept when the batch empties
        self.reset()

    def __len__(self) -> int:
        return len(self.act)

    def reset(self) -> None:
        self.act = _ActiveUsers(self.device, self.width)
        self._widest = 0   # static step: out-degree of the widest trie node the live beams stand on

    @torch.no_grad()
    def _shared_prefill(self):
        if self._shared is None:
            ids = torch.tensor([self.shared_tokens], device=self.device)
            self._shared = self.model.prefill(ids, torch.ones_like(ids))
        return self._shared

    def admit(self, reqs: list) -> None:
        """Prefills `reqs` (one call per group: those after the shared prefix, the others) and adds them."""
        S = self.shared_tokens
        if S is None:
            return self._admit(reqs, 0)
        n = len(S)
        after = [r for r in reqs if len(r.prompt) > n and r.prompt[:n] == S]
        other = [r for r in reqs if not (len(r.prompt) > n and r.prompt[:n] == S)]
        if after:
            self._admit(after, n)
        if other:
            self._admit(other, 0)

    def check(self, req) -> None:
        """Raises ValueError for a request this batch cannot decode (called when it is submitted)."""
        if not 1 <= req.top_k <= self.width:
            raise ValueError(f"top_k must be in [1, {self.width}], got {req.top_k}")
        if not req.prompt:
            raise ValueError("empty prompt")

    @torch.no_grad()
    def _admit(self, reqs: list, start: int) -> None:
        model, act, device, K = self.model, self.act, self.device, self.K
        ids, mask = left_pad([r.prompt[start:] for r in reqs], self.pad_id, device)
        prefix = model.think(model.prefill(ids, mask, self._shared_prefill() if start else None))
        n = len(reqs)
        nodes = torch.full((n, K), self.dead, dtype=torch.long, device=device)
        nodes[:, 0] = 0                                                    # the root; the other beams dead
        sums = torch.full((n, K), NEG_INF, device=device)
        sums[:, 0] = 0.0
        rows_of = len(act.logits) if act.logits is not None else 0
        logit_row = rows_of + torch.arange(n, device=device).repeat_interleave(K)
        scores = self.assistant_of([r.key for r in reqs]) if self.assistant_of is not None else None
        fresh = act.cache is None
        if fresh and self.static and self._static_kv is not None:
            # an emptied batch keeps its static storage (and the CUDA graphs over it)
            act.cache = self._static_kv
            for layer in act.cache.layers:
                layer.users = 0
        if act.cache is None:
            from transformers import DynamicCache

            kind, slots = (StaticBeamKV, self.slots) if self.static else (BeamKV, _SLOT_CHUNK)
            act.cache = DynamicCache()
            act.cache.layers = [kind(layer.keys, layer.values, prefix.attention_mask, K, slots)
                                for layer in prefix.cache.layers]
            if self.static:
                self._static_kv = act.cache
        else:
            for layer, new in zip(act.cache.layers, prefix.cache.layers):
                layer.append(new.keys, new.values, prefix.attention_mask)
        if self.static:
            self._widest = max(self._widest, self.root_degree)
        if fresh:
            act.logits, act.sums = prefix.last_logits, sums
        else:
            act.logits = torch.cat([act.logits, prefix.last_logits])
            act.sums = torch.cat([act.sums, sums])
        act.reqs = act.reqs + list(reqs)
        act.uids = torch.cat([act.uids, torch.tensor([r.uid for r in reqs], dtype=torch.long, device=device)])
        act.top_k = torch.cat([act.top_k, torch.tensor([r.top_k for r in reqs], dtype=torch.long, device=device)])
        act.pool_scores = torch.cat([act.pool_scores, torch.full((n, self.width), NEG_INF, device=device)])
        act.pool_titles = torch.cat([act.pool_titles,
                                     torch.full((n, self.width), -1, dtype=torch.long, device=device)])
        act.nodes = torch.cat([act.nodes, nodes.view(-1)])
        act.fed = torch.cat([act.fed, torch.zeros(n, dtype=torch.long, device=device)])
        act.fed_host = act.fed_host + [0] * n
        slots = self.slots if self.static else _SLOT_CHUNK if act.lineage is None else act.lineage.shape[2]
        lineage = torch.zeros(n, K, slots, dtype=torch.long, device=device)
        act.lineage = lineage if act.lineage is None else torch.cat([act.lineage, lineage])
        act.base_pos = torch.cat([act.base_pos, prefix.next_position])
        act.logit_row = torch.cat([act.logit_row, logit_row])
        if scores is not None:
            if act.assistant is not None:
                scores.log_mass = torch.cat([act.assistant.log_mass, scores.log_mass])
            act.assistant = scores
        if any(r.exclude for r in reqs):
            self._rebuild_excluded()

    def _blocked_nodes(self, exclude) -> torch.Tensor:
        """Trie nodes with nothing but excluded titles below them (their leaves and the paths that lead
        only to them): a beam never enters one, so no beam is spent on a title it may not return."""
        trie = self.trie
        if self._item_title is None:
            at_leaf = trie.leaf_title_index[trie.incidence_node] >= 0
            self._item_title = torch.full((trie.num_items,), -1, dtype=torch.long, device=self.device)
            self._item_title[trie.incidence_item[at_leaf]] = trie.leaf_title_index[trie.incidence_node[at_leaf]]
        excluded = torch.isin(self._item_title, torch.tensor(list(exclude), dtype=torch.long, device=self.device))
        below = trie.subtree_sum(excluded.float()[None])[0]                       # excluded items below a node
        return torch.nonzero(below.round().long() == trie.node_item_count).view(-1)

    def _rebuild_excluded(self) -> None:
        act, N = self.act, self.trie.num_nodes
        keys = []
        for r in act.reqs:
            if r.exclude:
                blocked = getattr(r, "_blocked", None)
                if blocked is None:
                    blocked = r._blocked = self._blocked_nodes(r.exclude)
                keys.append(r.uid * N + blocked)
        act.excluded = torch.cat(keys).sort().values if keys else None

    def _keep(self, kept: list[int]) -> torch.Tensor:
        """Keeps the active users `kept` (indices, ascending): every per-user and per-row state.

        A kept user keeps its place where it can; the places of the users that leave are taken by the
        last kept users (in the KV cache one user's copy each, not the whole batch's).  Returns the new
        order (new user i is old user order[i]) for the caller's per-user tensors.
        """
        act, K, n = self.act, self.K, len(kept)
        holes = sorted(set(range(n)).difference(kept))
        order_host = list(range(n))
        for h, u in zip(holes, [u for u in kept if u >= n]):
            order_host[h] = u
        order = torch.tensor(order_host, dtype=torch.long, device=self.device)
        rows = (order[:, None] * K + torch.arange(K, device=self.device)).view(-1)
        for layer in act.cache.layers:
            layer.select(order, holes)
        had_excluded = act.excluded is not None
        act.reqs = [act.reqs[i] for i in order_host]
        act.fed_host = [act.fed_host[i] for i in order_host]
        act.uids, act.top_k, act.sums, act.fed = act.uids[order], act.top_k[order], act.sums[order], act.fed[order]
        act.pool_scores, act.pool_titles = act.pool_scores[order], act.pool_titles[order]
        act.base_pos, act.lineage = act.base_pos[order], act.lineage[order]
        act.nodes, act.logit_row = act.nodes[rows], act.logit_row[rows]
        if act.assistant is not None:
            act.assistant.log_mass = act.assistant.log_mass[order]
        if had_excluded:
            self._rebuild_excluded()
        return order

    def retire(self, predicate) -> None:
        """Drops the active users whose request satisfies `predicate` (no result for them)."""
        keep = [i for i, r in enumerate(self.act.reqs) if not predicate(r)]
        if len(keep) == len(self.act):
            return
        if not keep:
            return self.reset()
        self._keep(keep)

    def _result(self, u: int):
        act = self.act
        k = int(act.top_k[u])
        idx, sc = act.pool_titles[u, :k], act.pool_scores[u, :k]
        found = idx >= 0
        idx = idx[found].tolist()
        return DecodeResult([self.trie.titles_unique[i] for i in idx], sc[found].tolist(), idx)

    def _edges_flat(self):
        """Eager: every out-edge of every live beam, flat and user-sorted -> per-user top 2K candidates."""
        act, trie, K, V = self.act, self.trie, self.K, self.trie.vocab_size
        lse = torch.logsumexp(act.logits[:, :V].float(), dim=-1)           # (M,)
        rows, tokens, kids = trie.edges(act.nodes)                         # rows sorted: user-major
        lrow = act.logit_row[rows]
        cand = act.sums.view(-1)[rows] + (act.logits[lrow, tokens].float() - lse[lrow])
        urow = torch.div(rows, K, rounding_mode="floor")
        cand = self._edge_terms(cand, urow, act.nodes[rows], kids)
        top_val, e = _user_topk(cand, urow, len(act), 2 * K)                 # (U, 2K)
        return top_val, rows[e], tokens[e], kids[e]

    def _edges_padded(self, width: int):
        """Static: every live beam's out-edges padded to `width` (R, width) -> per-user top 2K candidates."""
        act, trie, K, V = self.act, self.trie, self.K, self.trie.vocab_size
        U, nodes = len(act), act.nodes
        lse = torch.logsumexp(act.logits[:, :V].float(), dim=-1)           # (M,)
        start = trie.row_ptr[nodes]
        col = torch.arange(width, device=self.device)
        valid = col < (trie.row_ptr[nodes + 1] - start)[:, None]             # (R, width)
        idx = (start[:, None] + col).clamp_(max=max(trie.num_edges - 1, 0))
        tokens, kids = trie.edge_token[idx], trie.edge_child[idx]
        lrow = act.logit_row
        cand = act.sums.view(-1)[:, None] + (act.logits[lrow[:, None], tokens].float() - lse[lrow][:, None])
        urow = torch.div(torch.arange(U * K, device=self.device), K, rounding_mode="floor")[:, None]
        cand = self._edge_terms(cand, urow, nodes[:, None], kids).masked_fill(~valid, NEG_INF)
        top_val, e = cand.view(U, K * width).topk(2 * K, dim=1)             # (U, 2K)
        src = torch.arange(U, device=self.device)[:, None] * K + torch.div(e, width, rounding_mode="floor")
        return top_val, src, tokens.view(U, -1).gather(1, e), kids.view(U, -1).gather(1, e)

    def _edge_terms(self, cand, urow, parents, kids):
        """The assistant's edge scores (D3) and the users' excluded subtrees (-inf), added to `cand`."""
        act = self.act
        if act.assistant is not None:   # text-free scores of the edges (D3), <= 0
            cand = cand + act.assistant.edge_scores(urow, parents, kids)
        if act.excluded is not None:    # a user's excluded titles: their subtrees are masked for it alone
            key = act.uids[urow] * self.trie.num_nodes + kids
            cand = cand.masked_fill(torch.isin(key, act.excluded), NEG_INF)
        return cand

    def _select(self, top_val, src, token, child):
        """The 2K best candidates of each user -> its pool of finished titles and its next K beams.

        Returns (sums, next_nodes, next_tokens, perm, live, keep): the next beams (U, K) (-inf / a leaf /
        token 0 where dead), the column each continues, and which users still run.
        """
        act, trie, K, U = self.act, self.trie, self.K, len(self.act)
        alive = top_val > NEG_INF
        leaf = (trie.leaf_title_index[child] >= 0) & alive

        # finished titles -> the user's pool of the best top_k
        fin_scores = torch.where(leaf, _normalise(top_val, (act.fed + 1)[:, None], self.length_penalty), NEG_INF)
        fin_titles = torch.where(leaf, trie.leaf_title_index[child], -1)
        merged_s = torch.cat([act.pool_scores, fin_scores], 1)
        merged_t = torch.cat([act.pool_titles, fin_titles], 1)
        best_s, order = merged_s.topk(self.width, dim=1)
        act.pool_scores, act.pool_titles = best_s, merged_t.gather(1, order)

        # unfinished candidates -> next beams
        sums, pick = torch.where(leaf | ~alive, NEG_INF, top_val).topk(K, dim=1)   # (U, K)
        live = sums > NEG_INF
        next_nodes = torch.where(live, child.gather(1, pick), self.dead)
        next_tokens = torch.where(live, token.gather(1, pick), 0)
        # beam k continues beam perm[u, k] of its user (a dead beam: any, it does not run)
        perm = torch.where(live, src.gather(1, pick) - torch.arange(U, device=self.device)[:, None] * K, 0)

        # a user is done when its pool holds its top_k and no live beam can still enter it
        bound = _upper_bound(sums, self.leaf_depth[next_nodes], self.length_penalty).masked_fill(~live, NEG_INF)
        kth = best_s.gather(1, (act.top_k - 1)[:, None])[:, 0]
        pool_full = kth > NEG_INF
        keep = live.any(dim=1) & (~pool_full | (bound.max(dim=1).values > kth))
        act.sums, act.nodes = sums, next_nodes.view(-1)
        return sums, next_nodes, next_tokens, perm, live, keep

    def _advance_lineage(self, perm: torch.Tensor) -> None:
        """The KV never moves: a beam's ancestry says which column it reads at each earlier slot, and its
        new token goes to its own column k at slot fed[u]."""
        act, K = self.act, self.K
        act.lineage = act.lineage.gather(1, perm[:, :, None].expand_as(act.lineage))
        if not self.static and int(act.fed.max()) >= act.lineage.shape[2]:
            act.lineage = F.pad(act.lineage, (0, _SLOT_CHUNK))
        columns = torch.arange(K, device=self.device)
        act.lineage[torch.arange(len(act), device=self.device)[:, None], columns, act.fed[:, None]] = columns

    @torch.no_grad()
    def step(self) -> list:
        """One beam step for every active user; [(request, DecodeResult)] of the users that finished."""
        if not len(self.act):
            return []
        if self.static:
            return self._static_step()
        act, K, device = self.act, self.K, self.device
        U = len(act)
        # ---- score every candidate edge of every live beam, pick the next beams
        sums, next_nodes, next_tokens, perm, live, keep = self._select(*self._edges_flat())
        stays = keep.tolist()
        finished = [(act.reqs[u], self._result(u)) for u in range(U) if not stays[u]]
        n_keep = U - len(finished)
        if n_keep == 0:
            self.reset()
            return finished
        if n_keep < U:
            order = self._keep([u for u in range(U) if stays[u]])
            perm, next_tokens, live = perm[order], next_tokens[order], live[order]
        act = self.act
        self._advance_lineage(perm)

        # ---- one token per live beam row: row r writes its K/V at slot fed[user] (position base_pos + fed)
        R = n_keep * K
        all_rows = torch.arange(R, device=device)
        run = torch.nonzero(live.view(-1)).view(-1) if self.run_step.runs_row_subset else all_rows
        begin_beam_step(act.cache, act.fed, run, act.lineage)
        positions = (act.base_pos + act.fed).repeat_interleave(K)[run]
        act.logits = self.run_step(next_tokens.view(-1)[run], positions, run, R, act.cache)
        # row r's logits: its index among the rows that ran (a dead row's is never read: it has no edges)
        act.logit_row = all_rows if run.numel() == R else \
            torch.zeros(R, dtype=torch.long, device=device).index_copy_(0, run, all_rows[: run.numel()])
        act.fed = act.fed + 1
        act.fed_host = [f + 1 for f in act.fed_host]
        return finished

    def _static_step(self) -> list:
        """The static-shape step: no data-dependent shape and one host read (the stop check, below)."""
        act, trie, K, device = self.act, self.trie, self.K, self.device
        U = len(act)
        width = _bucket(max(self._widest, 2))   # K * width >= 2K candidates per user
        sums, next_nodes, next_tokens, perm, live, keep = self._select(*self._edges_padded(width))
        # ---- the one host read: who stays, how many beam rows run next, the widest trie node ahead
        degree = (trie.row_ptr[next_nodes + 1] - trie.row_ptr[next_nodes]).masked_fill(~keep[:, None], 0)
        info = torch.cat([keep.long(), (live & keep[:, None]).sum().view(1), degree.max().view(1)]).tolist()
        stays, n_live, self._widest = info[:U], info[U], info[U + 1]
        finished = [(act.reqs[u], self._result(u)) for u in range(U) if not stays[u]]
        n_keep = U - len(finished)
        if n_keep == 0:
            self.reset()
            return finished
        if n_keep < U:
            order = self._keep([u for u in range(U) if stays[u]])
            perm, next_tokens, live = perm[order], next_tokens[order], live[order]
        act = self.act
        self._advance_lineage(perm)

        # ---- the live rows first, padded with dead ones (of the active users or the free places) to a bucket
        cache = act.cache
        R, R_cap = n_keep * K, cache.layers[0].places * K
        rows = _bucket(n_live, R_cap)
        pad = R_cap - R
        live_all = F.pad(live.reshape(-1), (0, pad))
        all_rows = torch.arange(R_cap, device=device)
        run = all_rows if rows == R_cap else torch.argsort(torch.where(live_all, all_rows, all_rows + R_cap))[:rows]
        tokens = F.pad(next_tokens.reshape(-1), (0, pad))[run]
        positions = F.pad((act.base_pos + act.fed).repeat_interleave(K), (0, pad))[run]
        # attention reads the slots written so far, rounded up to a bucket (a prefix of the fixed storage)
        slots = _bucket(max(act.fed_host) + 1, self.slots)
        fed = F.pad(act.fed, (0, R_cap // K - n_keep))
        lineage = F.pad(act.lineage[:, :, :slots], (0, 0, 0, 0, 0, R_cap // K - n_keep))
        if self.graphs is not None:
            act.logits = self.graphs((rows, slots), cache.layers[0].generation, tokens, positions, run, fed,
                                     lineage)
        else:
            act.logits = self._static_forward(tokens, positions, run, fed, lineage)
        # row r's logits: its index among the rows that ran (a dead row's is never read: it has no edges)
        act.logit_row = torch.zeros(R_cap, dtype=torch.long, device=device).index_copy_(
            0, run, all_rows[:rows])[:R]
        act.fed = act.fed + 1
        act.fed_host = [f + 1 for f in act.fed_host]
        return finished

    def _static_forward(self, tokens, positions, run, fed, lineage) -> torch.Tensor:
        """The forward of the static-shape step (what a CUDA graph captures): fixed shapes, no host read."""
        cache = self.act.cache
        begin_beam_step(cache, fed, run, lineage, slots=lineage.shape[2])
        return self.run_step(tokens, positions, run, cache.layers[0].places * self.K, cache)


def batch_shared_prefix(prompts: list[list[int]]) -> list[int] | None:
    """The prefix to prefill once for a known list of prompts (None when too short to pay)."""
    if len(prompts) < 2:
        return None
    start = min(shared_prefix_length(prompts), min(len(p) for p in prompts) - 1)
    return prompts[0][:start] if start >= _MIN_SHARED_PREFIX else None


@torch.no_grad()
def beam_search_prompts(model: LatentR3Model, trie: ItemTrie, prompts: list[list[int]], pad_id: int,
                        max_users: int = 16, num_beams: int = 10, top_k: int = 10, length_penalty: float = 1.0,
                        assistant=None, fast_step: bool = True, share_prefix: bool = True,
                        refill: float = 1.0, progress=None, cuda_graphs: str = "auto") -> BeamResult:
    """Top-k distinct catalogue titles for every prompt (token id lists), decoding up to `max_users` at once.

    A thin user of `engine.DecodingEngine` over a `BeamBatch`: every prompt is submitted, then decoded
    in the calling thread.  Memory stays bounded by `max_users`.  Continuous batching: waiting users
    are admitted (prefilled) once a fraction `refill` of the `max_users` places is free, so the batch
    need not run its last steps for a few slow users; refill = 1.0 admits only into an empty batch
    (static batches).  The results do not depend on which users share a batch.  `assistant`, when
    given, maps a list of prompt indices to their `decoding.assistant.AssistantScores` (D3):
    weight * log(subtree mass of child / of parent) is added to every candidate edge.  `fast_step` runs
    the beam steps through `LlamaFamilyStep` when the backbone is one it supports; False (or another
    architecture) runs them through the backbone's own forward.  `share_prefix` prefills the token
    prefix common to all prompts once.  `progress.update(n)` is called as users finish.  `cuda_graphs`:
    the static-shape step (+ CUDA graphs) or the eager one (EvalConfig.cuda_graphs; same lists).
    """
    if not 0.0 < refill <= 1.0:
        raise ValueError(f"refill must be in (0, 1], got {refill}")
    shared = batch_shared_prefix(prompts) if share_prefix else None
    batch = BeamBatch(model, trie, pad_id, num_beams, top_k, length_penalty, assistant, fast_step, shared,
                      cuda_graphs)
    engine = DecodingEngine(batch, max_users, admit_at=max(1, int(max_users * refill)))
    futures = engine.submit_many([DecodeRequest(p, top_k, key=i) for i, p in enumerate(prompts)])
    engine.run_until_idle(progress)
    results = [f.result() for f in futures]
    index = torch.full((len(prompts), top_k), -1, dtype=torch.long)
    for b, r in enumerate(results):
        index[b, : len(r.title_index)] = torch.tensor(r.title_index, dtype=torch.long)
    return BeamResult([r.titles for r in results], [r.scores for r in results], index.to(model.device))


@torch.no_grad()
def constrained_beam_search(model: LatentR3Model, trie: ItemTrie, prompt_ids: torch.Tensor,
                            prompt_mask: torch.Tensor, num_beams: int = 10, top_k: int = 10,
                            length_penalty: float = 1.0, assistant=None, fast_step: bool = True) -> BeamResult:
    """`beam_search_prompts` for one left-padded batch, all users decoded together.

    `assistant`: decoding.assistant.AssistantScores with rows in prompt order (D3), or None.
    """
    if assistant is not None and assistant.weight == 0:
        assistant = None
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
    scores_of = None
    if assistant is not None:
        scores_of = lambda idx: type(assistant)(assistant.log_mass[idx], assistant.weight)  # noqa: E731
    return beam_search_prompts(model, trie, prompts, 0, len(prompts), num_beams, top_k, length_penalty,
                               scores_of, fast_step)
