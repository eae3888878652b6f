"""The Triton sampler (qwen2rt.kernels.sampler) against the PyTorch sampler (qwen2rt.sampling, its reference): the
same token for every row and form, the same recorded counts / seen, bit-exact uniforms, seeded rows reproducible in
any batch. On CPU through the Triton interpreter at small vocabularies; the full Qwen2 vocabulary and CUDA-graph
replay on a GPU.

Token equality is exact, which is the right check only away from float boundaries: the kernels' softmax sums in
another order than torch, so a probability within rounding of a top-p / min-p cut (or two race scores within
rounding) could go either way. Fresh randn * 3 logits put none there but with negligible probability."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE
from qwen2rt import SamplingParams
from qwen2rt.kernels import sampler
from qwen2rt.sampling import (TOPK_CANDIDATES, SamplerState, filter_sorted_logits, hash_uniform, ordered_candidates,
                              row_values, rows_tensor, sample_tokens, sampler_variant)

P = SamplingParams
# one batch of rows for each form: greedy, top-k only, top-p only, min-p, every penalty, temperatures 0.7 / 1.3
TOPK_ROWS = [P(temperature=0), P(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1),
             P(temperature=1.3, top_k=TOPK_CANDIDATES), P(temperature=1.0, top_k=50, min_p=0.05),
             P(temperature=0.7, top_k=7, presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=0.8),
             P(temperature=0, repetition_penalty=1.3, frequency_penalty=1.0)]
FULL_ROWS = TOPK_ROWS + [P(temperature=1.3, top_p=0.9), P(temperature=0.7, top_k=300), P(temperature=1.0),
                         P(temperature=1.3, min_p=0.01, presence_penalty=-0.5)]
GREEDY_ROWS = [P(temperature=0)] * 3
HOLDING = dict(min_tokens=2000, max_tokens=4096)  # rows whose random step (< 1000) is below min_tokens
# rows that add their logit bias (the state's row: the values here only set the flag) or hold tokens back
TOPK_ROWS += [P(temperature=0, logit_bias={1: 5.0}), P(temperature=0.9, top_k=40, logit_bias={2: -3.0}, **HOLDING)]
FULL_ROWS += [P(temperature=1.1, top_p=0.9, **HOLDING), P(temperature=1.0, logit_bias={3: 1.0}, min_tokens=1)]


def make_state(b, vocab, device=DEVICE, gen=None):
    """Every slot with a random prompt in `seen` and non-trivial output counts, a logit bias on a tenth of the
    vocabulary and a twentieth held back (read only by rows that ask for them); the padding slot too."""
    state = SamplerState(b, vocab, device)
    for slot in range(b + 1):
        state.seen[slot, torch.randint(0, vocab, (vocab // 10,), generator=gen)] = True
        idx = torch.randint(0, vocab, (vocab // 20,), generator=gen)
        state.counts[slot, idx] = torch.randint(1, 4, (idx.numel(),), generator=gen, dtype=torch.int32).to(device)
        state.seen[slot, idx] = True
        idx = torch.randint(0, vocab, (vocab // 10,), generator=gen)
        state.bias[slot, idx] = (torch.randn(idx.numel(), generator=gen) * 3).to(device)
        state.held[slot, torch.randint(0, vocab, (vocab // 20,), generator=gen)] = True
    return state


def copy_state(state):
    other = SamplerState(state.padding_slot, state.seen.shape[1], state.seen.device)
    for name in ("seen", "counts", "bias", "held"):
        getattr(other, name).copy_(getattr(state, name))
    return other


def rows_of(params, seeds, steps, slots, device=DEVICE):
    return rows_tensor([row_values(p.resolved(), s, t, slot) for p, s, t, slot in zip(params, seeds, steps, slots)],
                       device)


def run_both(logits, params, form, padding=1, chunk=None, seeds=None):
    """Triton and torch on copies of one state: (triton tokens, torch tokens, triton state, torch state). The last
    `padding` rows are padding rows (greedy, the padding slot), as the decode runner fills them."""
    b = len(params) + padding
    vocab = logits.shape[1]
    params = list(params) + [P(temperature=0)] * padding
    states = [make_state(b, vocab), None]
    states[1] = copy_state(states[0])
    slots = list(range(b - padding)) + [states[0].padding_slot] * padding
    seeds = seeds if seeds is not None else torch.randint(0, 2 ** 62, (b,)).tolist()
    rows = rows_of(params, seeds, torch.randint(0, 1000, (b,)).tolist(), slots, logits.device)
    tokens = [sampler.sample(logits, rows, states[0].counts, states[0].seen, form, chunk=chunk,
                             bias=states[0].bias, held=states[0].held),
              sampler.sample_ref(logits, rows, states[1].counts, states[1].seen, form, bias=states[1].bias,
                                 held=states[1].held)]
    return tokens[0], tokens[1], states[0], states[1]


@pytest.mark.parametrize("form, rows, vocab, chunk", [
    ("greedy", GREEDY_ROWS, 1000, None), ("topk", TOPK_ROWS, 1000, None), ("full", FULL_ROWS, 1000, None),
    ("greedy", GREEDY_ROWS, 4099, 1024)])
def test_same_tokens_and_records_as_torch(form, rows, vocab, chunk):
    """Every row of a mixed batch (greedy and sampled rows, penalties, a padding row) gets torch's token, and the
    recorded counts / seen equal torch's. V = 4099 in chunks of 1024: merged chunks, the last one of 3 tokens (the
    sampled forms' merge: test_rows_past_the_candidates_on_tied_logits)."""
    if form != "full":
        assert sampler_variant([p.resolved() for p in rows]) == form
    logits = torch.randn(len(rows) + 1, vocab, device=DEVICE) * 3
    ours, ref, state, ref_state = run_both(logits, rows, form, chunk=chunk)
    assert torch.equal(ours, ref), (ours, ref)
    assert torch.equal(state.counts, ref_state.counts) and torch.equal(state.seen, ref_state.seen)


def test_merge_of_many_chunks():
    """Step 2 merges the chunks' sorted candidates into the row's 256 (odd chunks read back to front). Eight chunks
    of 256 (the last of 108 tokens) and near-flat logits, so the row's candidates come from every chunk, drawn with
    top_k = all 256 at a high temperature: every candidate matters to the race, and a candidate set even a few
    tokens wrong changes some of the 10 rows' tokens (a merge that skips the reversal, tried, does)."""
    vocab, b = 7 * 256 + 108, 10
    logits = torch.randn(b, vocab, device=DEVICE) * 0.5
    rows = [P(temperature=2.0, top_k=TOPK_CANDIDATES)] * (b - 2) + [P(temperature=1.5, top_k=64)] * 2
    assert sampler_variant([p.resolved() for p in rows]) == "topk"
    ours, ref, state, ref_state = run_both(logits, rows, "topk", padding=0, chunk=256)
    assert torch.equal(ours, ref), (ours, ref)
    assert torch.equal(state.counts, ref_state.counts)


def kept_sizes(logits, params):
    """How many tokens the torch filters keep in each row (no penalties in these rows)."""
    r = rows_of(params, [0] * len(params), [0] * len(params), [0] * len(params), logits.device)
    top, _ = ordered_candidates(logits, logits.shape[1])
    t = torch.where(r.temperature > 0, r.temperature, torch.ones_like(r.temperature))
    return (filter_sorted_logits(top / t[:, None], r.top_k, r.top_p, r.min_p) > 0).sum(-1).tolist()


def test_rows_past_the_candidates_on_tied_logits():
    """The full form's third step (rows whose kept set outgrows the 256 candidates: top-p on a flat row, top_k
    between 256 and V, min-p far down, no filter at all) on bf16-valued logits full of exact ties, where the top-k
    cut falls inside a run of equal logits: torch's tokens, ties toward the lower id. With two rows that finish in
    step 2, the merge of three chunks of 1024 (the last one partial)."""
    vocab = 3001
    logits = (torch.randn(8, vocab, device=DEVICE) * 2).bfloat16().float()
    rows = [P(temperature=1.3, top_p=0.95), P(temperature=0.7, top_k=300), P(temperature=1.5, top_k=1000, top_p=0.8),
            P(temperature=1.0, min_p=0.002), P(temperature=0.9), P(temperature=0.7, top_k=20, top_p=0.8),
            P(temperature=1.3, top_p=0.5)]
    sizes = kept_sizes(logits[:7], rows)
    assert min(sizes[:5]) > TOPK_CANDIDATES and max(sizes[5:]) < TOPK_CANDIDATES, sizes  # step 3 / step 2 rows
    cut = logits[1].sort(descending=True).values[299]
    assert (logits[1] == cut).sum() > 1  # a tie straddles the 300th place
    ours, ref, state, ref_state = run_both(logits, rows, "full", chunk=1024)
    assert torch.equal(ours, ref), (ours, ref)
    assert torch.equal(state.counts, ref_state.counts) and torch.equal(state.seen, ref_state.seen)


def test_logit_bias_and_held_tokens_decide_the_token():
    """What the bias and the holds do, in both forms and both impls: +8 on one token makes a greedy row take it;
    a held argmax gives the runner-up while step < min_tokens, and the argmax again once step reaches it; a row that
    asks for neither ignores its state row (here biased and holding its argmax); a sampled row never draws a held
    token, even with top_k smaller than the held set."""
    vocab = 700
    logits = torch.randn(6, vocab, device=DEVICE) * 2
    order = logits.argsort(dim=1, descending=True)
    state = SamplerState(6, vocab, DEVICE)
    boosted = int(order[0, 100])
    state.bias[0, boosted] = 8.0 + (logits[0, order[0, 0]] - logits[0, boosted]).item()
    for row in (1, 2, 3):  # holding the argmax (row 3: an unflagged row over a biased, holding state row)
        state.held[row, order[row, 0]] = True
    state.bias[3, order[3, 5]] = 50.0
    state.held[4, order[4, :30]] = True
    rows = [P(temperature=0, logit_bias={boosted: 1.0}), P(temperature=0, **HOLDING), P(temperature=0, min_tokens=5),
            P(temperature=0, top_k=2), P(temperature=1.5, top_k=10, **HOLDING)]
    params, steps = rows + [rows[4]], [0, 0, 5, 0, 0, 0]
    want = [boosted, int(order[1, 1]), int(order[2, 0]), int(order[3, 0])]
    for form in ("topk", "full"):
        for impl in ("triton", "torch"):
            fresh = copy_state(state)
            r = rows_of(params, list(range(6)), steps, range(6))
            fn = sampler.sample if impl == "triton" else sampler.sample_ref
            got = fn(logits, r, fresh.counts, fresh.seen, form, bias=fresh.bias, held=fresh.held).tolist()
            assert got[:4] == want, (form, impl, got)
            assert got[4] not in order[4, :30].tolist() and got[5] not in order[4, :30].tolist()
            assert got[4] in order[4, 30:40].tolist()  # top_k 10 among the tokens left
    # the greedy form reads no bias or hold: sampler_variant picks it only for the row that asks for neither
    assert [sampler_variant([p.resolved()]) for p in rows] == ["topk"] * 3 + ["greedy", "topk"]
    with pytest.raises(ValueError, match="go together"):
        sampler.sample(logits, rows_of(params, [0] * 6, steps, range(6)), state.counts, state.seen, bias=state.bias)


def test_allowed_token_ids_rows_draw_only_those_tokens():
    """allowed_token_ids: the state row is -inf but at the allowed ids (SamplerState.reset), so every row, greedy or
    sampled in either form with top-k larger than the allowed set, penalties, top-p, min-p or a hold on one of them,
    draws only allowed tokens, the same in both impls; a greedy row takes the best allowed logit (+ its bias), not
    the argmax; a single allowed token is always drawn."""
    check_allowed_rows(700)


@pytest.mark.gpu
def test_allowed_token_ids_at_the_full_vocabulary_on_gpu():
    check_allowed_rows(151936)


def check_allowed_rows(vocab: int) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(8, vocab, generator=gen) * 3).to(DEVICE)
    allowed = [[3, 250, vocab - 1], [3, 250, vocab - 1], [17], [1, 2, 3, 4, 5], [40, 41], [600, 3, 9], [8, 9],
               [3, 250, vocab - 1]]
    params = [P(temperature=0, allowed_token_ids=allowed[0]),
              P(temperature=0, allowed_token_ids=allowed[1], logit_bias={3: 100.0, 5: 100.0}),
              P(temperature=1.0, top_k=20, allowed_token_ids=allowed[2]),
              P(temperature=1.3, top_k=TOPK_CANDIDATES, repetition_penalty=1.3, presence_penalty=0.5,
                allowed_token_ids=allowed[3]),
              P(temperature=0.8, top_p=0.5, allowed_token_ids=allowed[4]),
              P(temperature=1.0, min_p=0.2, allowed_token_ids=allowed[5], **HOLDING),
              P(temperature=1.0, allowed_token_ids=allowed[6]),
              P(temperature=0.7, top_k=2, allowed_token_ids=allowed[7])]
    state = SamplerState(8, vocab, DEVICE)
    for slot, (p, ids) in enumerate(zip(params, allowed)):
        state.reset(slot, [slot], p.logit_bias, {600} if p.min_tokens else None, (), ids)
    assert state.bias[1, 3] == 100.0 and state.bias[1, 5] == float("-inf") and state.bias[0, 3] == 0.0
    for form in ("topk", "full"):
        if form == "topk":
            rows = [p for p in params if p.top_k is None or p.top_k <= TOPK_CANDIDATES]
        else:
            rows = params
        for seed in range(3):
            got = []
            for fn in (sampler.sample, sampler.sample_ref):
                fresh = copy_state(state)
                r = rows_of(rows, [seed * 100 + i for i in range(len(rows))], [0] * len(rows), range(len(rows)))
                got.append(fn(logits[:len(rows)], r, fresh.counts, fresh.seen, form, bias=fresh.bias,
                              held=fresh.held).tolist())
            assert got[0] == got[1], (form, seed)
            assert all(t in ids for t, ids in zip(got[0], allowed)), (form, got[0])
            best = max(allowed[0], key=lambda t: logits[0, t].item())
            assert got[0][0] == best and got[0][1] == 3 and got[0][2] == 17 and got[0][5] != 600


def test_uniforms_are_bit_exact():
    seeds = torch.tensor([0, 1, 5 + (1 << 32), 7 << 40, 2 ** 63 - 1, 123456789], device=DEVICE)
    steps = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31 + 5, 1000, 3], device=DEVICE)
    ids = torch.cat([torch.arange(3000), torch.tensor([151935, 2 ** 31 - 1])]).to(DEVICE)
    ours = sampler.hash_uniform(seeds, steps, ids)
    assert torch.equal(ours, hash_uniform(seeds, steps, ids[None, :]))
    assert ours.min() >= 2 ** -24 and ours.max() <= 1 - 2 ** -24


def test_seeded_rows_draw_the_same_token_in_any_batch():
    """A seeded row alone, then among 3 or 7 other rows at three positions: bitwise the same token, in both
    sampled forms."""
    vocab = 1000
    row_logits = torch.randn(1, vocab, device=DEVICE) * 2
    mine = P(temperature=1.0, top_k=100, top_p=0.9)
    for form in ("topk", "full"):
        alone = sampler.sample(row_logits, rows_of([mine], [42], [9], [0]), *state_tensors(1, vocab), form)
        for b, position in ((4, 0), (4, 3), (8, 5)):
            logits = torch.randn(b, vocab, device=DEVICE) * 2
            logits[position] = row_logits[0]
            params = [P(temperature=0.8, top_k=20)] * b
            params[position] = mine
            seeds = torch.randint(0, 2 ** 40, (b,)).tolist()
            seeds[position] = 42
            tokens = sampler.sample(logits, rows_of(params, seeds, [9] * b, range(b)), *state_tensors(b, vocab), form)
            assert tokens[position] == alone[0], (form, position)


def state_tensors(b, vocab):
    s = SamplerState(b, vocab, DEVICE)
    return s.counts, s.seen


def test_the_checks_catch_plausible_bugs():
    """Exact token equality is a sharp check: torch run with a plausible bug (temperature dropped; top-k one
    larger) gives other tokens than the kernel on the same seeds. Two leading logits 0.5 apart: the runner-up has
    probability ~0.035 at temperature 0.15 and ~0.38 at 1, so over 32 seeds the mutants differ in ~11 and ~12 rows
    (the chance that none differs is ~1e-6 and ~1e-7)."""
    vocab, b = 256, 32
    logits = torch.randn(1, vocab, device=DEVICE) - 6
    logits[0, 0], logits[0, 1] = 1.0, 0.5
    logits = logits[:, torch.randperm(vocab)].repeat(b, 1)  # the two at random ids
    seeds = torch.randint(0, 2 ** 40, (b,)).tolist()

    def draw(temperature, top_k, impl):
        state = SamplerState(b, vocab, DEVICE)
        rows = rows_of([P(temperature=temperature, top_k=top_k)] * b, seeds, [0] * b, range(b))
        return sample_tokens(logits, rows, state, "topk", impl=impl)

    ours = draw(0.15, 2, "triton")
    assert torch.equal(ours, draw(0.15, 2, "torch"))
    assert not torch.equal(ours, draw(1.0, 2, "torch"))  # temperature dropped
    ours = draw(1.0, 1, "triton")
    assert torch.equal(ours, draw(1.0, 1, "torch"))
    assert not torch.equal(ours, draw(1.0, 2, "torch"))  # top-k keeps one token too many


def test_strided_bf16_logits_and_dispatch():
    """bf16 logits, rows strided in memory (a slice of a wider buffer), through sample_tokens(impl="triton")."""
    base = (torch.randn(3, 1200, device=DEVICE) * 3).bfloat16()
    logits = base[:, :1000]
    params = [P(temperature=0.7, top_k=20, top_p=0.8), P(temperature=0), P(temperature=1.3, top_k=5)]
    seeds = [1, 2, 3]
    out = []
    for impl in ("triton", "torch"):
        state = SamplerState(3, 1000, DEVICE)
        out.append(sample_tokens(logits, rows_of(params, seeds, [4] * 3, range(3)), state, "topk", impl=impl))
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="impl"):
        sample_tokens(logits, rows_of(params, seeds, [4] * 3, range(3)), SamplerState(3, 1000, DEVICE), impl="cuda")


def test_bad_inputs():
    counts, seen = state_tensors(2, 100)
    rows = rows_of([P(temperature=0)] * 2, [0, 0], [0, 0], [0, 1])
    with pytest.raises(ValueError, match="form"):
        sampler.sample(torch.randn(2, 100, device=DEVICE), rows, counts, seen, "fast")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        sampler.sample(torch.randn(2, 100, device=DEVICE).double(), rows, counts, seen)
    with pytest.raises(ValueError, match="counts must be"):
        sampler.sample(torch.randn(2, 101, device=DEVICE), rows, counts, seen)
    with pytest.raises(ValueError, match=r"rows.temperature must be"):
        sampler.sample(torch.randn(3, 100, device=DEVICE), rows, counts, seen)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        sampler.sample(torch.randn(2, 100, device=DEVICE), rows, counts, seen, "topk", chunk=300)


@pytest.mark.parametrize("form", ["greedy", "topk", "full"])
def test_empty_vocabulary_is_an_error(form):
    # V = 0 failed inside the launch ("negative shift count", or torch's random_ in the reference)
    counts, seen = state_tensors(2, 0)
    rows = rows_of([P(temperature=0), P(temperature=1.0)], [1, 2], [0, 0], [0, 1])
    logits = torch.randn(2, 0, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with pytest.raises(ValueError, match=r"logits must hold at least one token \(V >= 1\), got shape \(2, 0\)"):
        sampler.sample(logits, rows, counts, seen, form)


# ---- GPU: the full vocabulary, CUDA graphs -----------------------------------------------------------------------

QWEN_VOCAB = 151936


@pytest.mark.gpu
@pytest.mark.parametrize("form, rows", [("greedy", GREEDY_ROWS * 3), ("topk", TOPK_ROWS), ("full", FULL_ROWS)])
def test_full_vocabulary_on_gpu(form, rows):
    logits = torch.randn(len(rows) + 2, QWEN_VOCAB, device="cuda") * 3
    ours, ref, state, ref_state = run_both(logits, rows, form, padding=2)
    assert torch.equal(ours, ref), (ours, ref)
    assert torch.equal(state.counts, ref_state.counts) and torch.equal(state.seen, ref_state.seen)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["greedy", "topk", "full"])
def test_cuda_graph_replay_equals_eager(form):
    b = 8
    rows_params = (FULL_ROWS if form == "full" else TOPK_ROWS if form == "topk" else GREEDY_ROWS) * 2
    logits = torch.randn(b, QWEN_VOCAB, device="cuda") * 3
    rows = rows_of(rows_params[:b], list(range(b)), [5] * b, list(range(b)), "cuda")
    eager_state = make_state(b, QWEN_VOCAB, "cuda")
    graph_state = copy_state(eager_state)

    def run(state):  # the engine's call: with the bias and held rows
        return sampler.sample(logits, rows, state.counts, state.seen, form, bias=state.bias, held=state.held)

    run(SamplerState(b, QWEN_VOCAB, "cuda"))  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_tokens = run(graph_state)
    for name in ("seen", "counts"):  # the capture does not run the kernels, but be explicit
        getattr(graph_state, name).copy_(getattr(eager_state, name))
    graph.replay()
    eager = run(eager_state)
    torch.cuda.synchronize()
    assert torch.equal(graph_tokens, eager)
    assert torch.equal(graph_state.counts, eager_state.counts) and torch.equal(graph_state.seen, eager_state.seen)
