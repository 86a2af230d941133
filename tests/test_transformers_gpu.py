"""Tiny transformers models on the GPU: attngen kernels for prefill against eager attention.

Rule for logits: the same model in float32 with eager attention is the reference; the bf16
model with attngen must be as close to it as the bf16 model with eager attention is:
rel(attngen) <= 1.5 * rel(eager) + 2e-3, rel(x) = ||x - ref|| / ||ref||.  Greedy generation
of 32 tokens must be identical to eager's, except that the two may part where the float32
model is at a near tie: where the gap between its top two logits is smaller than the amount by
which bf16 eager attention alone moves that position's logits away from float32.  There bf16
rounding, not attention, decides the token; the token chosen must still be one whose float32
logit is within that noise of the top one.
"""
import logging

import pytest
import torch

pytest.importorskip("transformers")

from attngen.integrations import transformers as ag  # noqa: E402
from attngen.testing import needs_gpu  # noqa: E402

from hf_models import MODELS, PACKED_ROWS, SEQUENCES, tiny_model  # noqa: E402

pytestmark = [pytest.mark.gpu, needs_gpu]
SEQ = 100          # longer than every tiny model's window (8, or 16 for ModernBERT)


def _ran_on_every_layer(model, runs, calls_per_layer):
    """attngen's kernels ran for every attention layer (``runs``: the attngen_runs fixture),
    ``calls_per_layer`` times each: no layer fell back to PyTorch, logged or not."""
    layers = model.config.num_hidden_layers
    assert len(runs) >= calls_per_layer * layers, \
        f"attngen ran {len(runs)} times; {layers} layers need {calls_per_layer * layers}"


def _rel(x, ref) -> float:
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _pooled_sinks(grads: dict) -> dict:
    """``grads`` with every layer's sink logits (a few scalars each) as one vector: alone,
    their errors scatter from 0.03 to 0.6 between random draws, for bf16 eager and attngen
    alike (each a sum over rows with cancellation, downstream of every bf16 layer)."""
    sinks = sorted(n for n in grads if n.endswith(".sinks"))
    if not sinks:
        return grads
    pooled = {n: g for n, g in grads.items() if n not in sinks}
    pooled["sinks (all layers)"] = torch.cat([grads[n].flatten() for n in sinks])
    return pooled


def _gradients_within_rule(family: str, exact: dict, peer: dict, got: dict, peer_name: str):
    """Every parameter's gradient error against ``exact`` (the sinks of all layers pooled) is
    within 2 x the ``peer`` model's + 5e-3; returns the worst (attngen's error, the peer's,
    parameter)."""
    assert set(got) == set(peer) == set(exact)
    exact, peer, got = (_pooled_sinks(g) for g in (exact, peer, got))
    worst = (0.0, 0.0, "")
    for name, ref in exact.items():
        ours, theirs = _rel(got[name], ref), _rel(peer[name], ref)
        assert ours <= 2 * theirs + 5e-3, \
            f"{family} {name}: gradient error {ours:.2e} vs {peer_name} {theirs:.2e}"
        worst = max(worst, (ours, theirs, name))
    return worst


@pytest.mark.parametrize("family", sorted(MODELS))
def test_logits_and_greedy_generation_match_eager(family, caplog, capsys, attngen_runs, device):
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    # gpt-oss routes each token to all its experts here: with top-2 of 4, bf16 noise flips the
    # discrete routing, and a flipped token's logits then move by more than attention's rounding
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1, **overrides).to(device)
    ids = torch.randint(1, model.config.vocab_size, (2, SEQ), device=device)
    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        model.set_attn_implementation("attngen")
        with caplog.at_level(logging.WARNING, logger="attngen"):
            got = model(input_ids=ids).logits.float()
    fell_back = [r.message for r in caplog.records if "falling back" in r.message]
    assert not fell_back, fell_back                         # prefill ran on attngen kernels
    _ran_on_every_layer(model, attngen_runs, 1)
    with torch.no_grad():
        model.float().set_attn_implementation("eager")
        reference = model(input_ids=ids).logits.float()
        model.to(torch.bfloat16)
    rel = lambda x: ((x - reference).norm() / reference.norm()).item()  # noqa: E731
    with capsys.disabled():
        print(f"\n{family}: logits vs fp32 eager: attngen bf16 {rel(got):.2e}, eager bf16 {rel(eager):.2e}")
    assert rel(got) <= 1.5 * rel(eager) + 2e-3

    if MODELS[family]["causal"]:
        prompt = ids[:1]
        with torch.no_grad():
            ref = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
            model.set_attn_implementation("attngen")
            out = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        if not torch.equal(out, ref):
            at = int((out[0] != ref[0]).nonzero()[0])
            prefix = ref[:, :at]
            with torch.no_grad():
                model.set_attn_implementation("eager")
                noisy = model(input_ids=prefix).logits[0, -1].float()        # bf16 eager
                model.float()
                exact = model(input_ids=prefix).logits[0, -1]               # float32 eager
            top = exact.topk(2)
            gap = (top.values[0] - top.values[1]).item()
            noise = (noisy - exact).abs().max().item()
            with capsys.disabled():
                print(f"{family}: generations part at token {at - prompt.shape[1]} of 32; float32 "
                      f"top-2 gap there {gap:.3e}, bf16 eager logit noise {noise:.3e}")
            chosen = (top.values[0] - exact[int(out[0, at])]).item()
            with capsys.disabled():
                print(f"{family}: attngen's token there is {chosen:.3e} below the float32 top")
            assert gap <= noise and chosen <= noise, \
                f"{family}: generations differ where the float32 model is not at a tie"  # noqa: E501


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_training_step_keeps_attention_gradients(family, deterministic, caplog, capsys, attngen_runs, device):
    """train() mode runs attngen's generated backward (no fallback), the fused one by default
    and the deterministic one under torch.use_deterministic_algorithms.  Rule for every
    parameter: against the float32 eager model with the same weights, the attngen model's
    gradient is within 2 x the bf16 eager model's error + 5e-3."""
    import copy

    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    # gpt-oss routes each token to all its experts here: with top-2 of 4, bf16 noise flips the
    # discrete routing of some tokens, which then dominates every gradient's error
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1, **overrides).to(device).train()
    exact_model = copy.deepcopy(model).float()            # the same (bf16) weights in float32
    ids = torch.randint(1, model.config.vocab_size, (2, SEQ), device=device)

    def grads(m):
        m.zero_grad()
        m(input_ids=ids).logits.float().square().mean().backward()
        return {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    exact, eager = grads(exact_model), grads(model)
    model.set_attn_implementation("attngen")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    attngen_runs.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="attngen"):
            got = grads(model)
    finally:
        torch.use_deterministic_algorithms(before)
    _ran_on_every_layer(model, attngen_runs, 2)                 # forward and backward
    worst = _gradients_within_rule(family, exact, eager, got, "bf16 eager")
    with capsys.disabled():
        print(f"\n{family} ({'deterministic' if deterministic else 'fused'} backward): worst gradient "
              f"vs fp32 eager: attngen {worst[0]:.2e} "
              f"(bf16 eager {worst[1]:.2e}) at {worst[2]}")
    fell_back = [r.message for r in caplog.records if "falling back" in r.message]
    assert not fell_back, fell_back


@pytest.mark.parametrize("family", sorted(MODELS))
def test_mixed_precision_training_runs_on_attngen(family, caplog, capsys, attngen_runs, device):
    """fp32 weights under torch.autocast(bf16), as transformers' Trainer runs with bf16=True:
    rotary embeddings hand attention fp32 queries and keys, and every layer still runs on
    attngen's kernels, forward and backward, in bf16.  Rule for every parameter: against the
    fp32 model without autocast, the gradient is within 2 x eager attention's error under the
    same autocast + 5e-3."""
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "eager", torch.float32, initializer_range=0.1, **overrides).to(device).train()
    ids = torch.randint(1, model.config.vocab_size, (2, SEQ), device=device)

    def grads(autocast: bool):
        model.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    exact, eager = grads(False), grads(True)
    model.set_attn_implementation("attngen")
    attngen_runs.clear()
    with caplog.at_level(logging.WARNING, logger="attngen"):
        got = grads(True)
    fell_back = [r.message for r in caplog.records if "falling back" in r.message]
    assert not fell_back, fell_back
    _ran_on_every_layer(model, attngen_runs, 2)                 # forward and backward
    worst = _gradients_within_rule(family, exact, eager, got, "eager under autocast")
    with capsys.disabled():
        print(f"\n{family} (fp32 weights, bf16 autocast): worst gradient vs fp32: attngen {worst[0]:.2e} "
              f"(eager {worst[1]:.2e}) at {worst[2]}")


@pytest.mark.parametrize("family, how", [(f, h) for f in sorted(MODELS) for h in ("position_ids", "offsets")
                                         if (f, h) != ("modernbert", "position_ids")])
def test_packed_rows_train_on_the_packed_kernels(family, how, caplog, capsys, attngen_runs, device):
    """A padding-free training batch (several sequences along each row: restarting position
    ids, or FlashAttention's cu_seq_lens/max_length) runs on attngen's packed kernels with its
    sequences kept apart.  Reference: the float32 eager model run on each sequence alone (its
    loss the sum of theirs); the attngen bf16 model's logits and every gradient must be as close
    to it as the bf16 eager model's, run on each sequence alone (1.5 x + 2e-3; 2 x + 5e-3)."""
    import copy

    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    model = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1, **overrides).to(device).train()
    exact = copy.deepcopy(model).float()
    ids = torch.randint(1, model.config.vocab_size, (2, 28), device=device)
    cu = torch.tensor([0, 12, 22, 28, 49, 56], dtype=torch.int32, device=device)
    extra = {"position_ids": torch.tensor(PACKED_ROWS, device=device)}
    if how == "offsets":
        extra.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=21, max_length_k=21)

    def alone(m):       # logits of each sequence run alone, and their gradients
        m.zero_grad()
        logits = [m(input_ids=ids[r:r + 1, a:b], use_cache=False).logits[0].float() for r, a, b in SEQUENCES]
        (sum(x.square().sum() for x in logits) / ids.numel()).backward()
        grads = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}
        return torch.cat(logits), grads

    (ref, ref_g), (eager, eager_g) = alone(exact), alone(model)
    model.set_attn_implementation("attngen")
    model.zero_grad()
    attngen_runs.clear()
    with caplog.at_level(logging.WARNING, logger="attngen"):
        packed = model(input_ids=ids, use_cache=False, **extra).logits.float()
        (packed.square().sum() / ids.numel()).backward()       # the loss ``alone`` takes
    fell_back = [r.message for r in caplog.records if "falling back" in r.message]
    assert not fell_back, fell_back
    _ran_on_every_layer(model, attngen_runs, 2)                 # forward and backward
    got = torch.cat([packed[r, a:b] for r, a, b in SEQUENCES])
    assert _rel(got, ref) <= 1.5 * _rel(eager, ref) + 2e-3, (_rel(got, ref), _rel(eager, ref))
    got_g = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    worst = _gradients_within_rule(family, ref_g, eager_g, got_g, "bf16 eager alone")
    with capsys.disabled():
        print(f"\n{family} packed rows ({how}): logits vs fp32 alone {_rel(got, ref):.2e} (bf16 eager alone "
              f"{_rel(eager, ref):.2e}); worst gradient {worst[0]:.2e} (eager {worst[1]:.2e}) at {worst[2]}")


def test_image_tokens_fall_back_with_transformers_mask(caplog, capsys, attngen_runs, device):
    """Gemma 3 with images (image tokens see each other both ways): those calls fall back to
    PyTorch with transformers' own mask, logits as close to the float32 eager model as bf16
    eager's; without images the same model runs on attngen's kernels."""
    import copy

    from hf_models import image_batch, tiny_gemma3_vision

    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    model = tiny_gemma3_vision("eager", torch.bfloat16, initializer_range=0.1).to(device)
    exact = copy.deepcopy(model).float()
    ids, token_types, pixels = image_batch(device, torch.bfloat16)

    def call(m, pixel_values=None):
        if pixel_values is None:        # text only
            return m(input_ids=ids[:, 17:], use_cache=False).logits.float()
        images = dict(token_type_ids=token_types, pixel_values=pixel_values)
        return m(input_ids=ids, use_cache=False, **images).logits.float()

    with torch.no_grad():
        ref, eager = call(exact, pixels.float()), call(model, pixels)
        text_ref, text_eager = call(exact), call(model)
        model.set_attn_implementation("attngen")
        with caplog.at_level(logging.WARNING, logger="attngen"):
            got = call(model, pixels)
        attngen_runs.clear()
        text_got = call(model)
    assert any("overlay" in r.message for r in caplog.records)
    assert _rel(got, ref) <= 1.5 * _rel(eager, ref) + 2e-3, (_rel(got, ref), _rel(eager, ref))
    _ran_on_every_layer(model.model.language_model, attngen_runs, 1)
    assert _rel(text_got, text_ref) <= 1.5 * _rel(text_eager, text_ref) + 2e-3
    with capsys.disabled():
        print(f"\ngemma3 with images: logits vs fp32 {_rel(got, ref):.2e} (bf16 eager {_rel(eager, ref):.2e})")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_gradient_checkpointing_gives_the_same_gradients(family, reentrant, attngen_runs, device):
    """transformers' gradient checkpointing runs each layer's forward again in the backward:
    with attngen's deterministic backward, the gradients are the bits of the run without it."""
    ag.register()
    torch.manual_seed(0)
    model = tiny_model(family, "attngen", torch.bfloat16, initializer_range=0.1).to(device).train()
    ids = torch.randint(1, model.config.vocab_size, (2, SEQ), device=device)

    def grads():
        model.zero_grad()
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        plain = grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        attngen_runs.clear()
        got = grads()
    finally:
        torch.use_deterministic_algorithms(before)
        model.gradient_checkpointing_disable()
    _ran_on_every_layer(model, attngen_runs, 3)                 # forward, its recomputation, backward
    assert set(got) == set(plain)
    for name, g in got.items():
        assert torch.equal(g, plain[name]), f"{family} {name}: gradient differs under checkpointing"


@pytest.mark.parametrize("family", sorted(MODELS))
def test_twenty_optimizer_steps_track_eager(family, capsys, attngen_runs, device):
    """20 AdamW steps from the same weights on the same batch: the attngen model's loss curve
    stays as close to the float32 eager model's as the bf16 eager model's does (2 x its largest
    relative deviation + 1e-2, at every step)."""
    import copy

    ag.register()
    torch.manual_seed(0)
    overrides = {"num_experts_per_tok": 4} if family == "gpt-oss" else {}
    start = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1, **overrides).to(device).train()
    ids = torch.randint(1, start.config.vocab_size, (2, SEQ), device=device)

    def curve(dtype, implementation):
        model = copy.deepcopy(start).to(dtype)
        model.set_attn_implementation(implementation)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    exact, eager = curve(torch.float32, "eager"), curve(torch.bfloat16, "eager")
    attngen_runs.clear()
    got = curve(torch.bfloat16, "attngen")
    _ran_on_every_layer(start, attngen_runs, 20 * 2)            # 20 forwards and backwards
    deviation = lambda c: ((c - exact).abs() / exact.abs()).max().item()  # noqa: E731
    with capsys.disabled():
        print(f"\n{family}: loss {exact[0]:.3f} -> {exact[-1]:.3f} (fp32 eager); largest relative "
              f"deviation: attngen {deviation(got):.2e}, bf16 eager {deviation(eager):.2e}")
    assert exact[-1] < exact[0]                                  # it trains
    assert deviation(got) <= 2 * deviation(eager) + 1e-2


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_padded_batch_runs_on_packed_kernels(family, side, caplog, capsys, attngen_runs, device):
    """A padded batch is packed to its valid tokens and runs on the varlen kernels (no
    fallback); logits at the valid positions follow the logits rule against float32 eager."""
    ag.register()
    ag._said.clear()
    torch.manual_seed(0)
    model = tiny_model(family, "eager", torch.bfloat16, initializer_range=0.1).to(device)
    ids = torch.randint(1, model.config.vocab_size, (3, SEQ), device=device)
    mask = torch.ones_like(ids)
    for row, count in ((1, 37), (2, 1)):               # much shorter, and one token shorter
        if side == "left":
            mask[row, :count] = 0
        else:
            mask[row, SEQ - count:] = 0
    keep = mask.bool()
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits.float()[keep]
        model.set_attn_implementation("attngen")
        attngen_runs.clear()
        with caplog.at_level(logging.WARNING, logger="attngen"):
            got = model(input_ids=ids, attention_mask=mask).logits.float()[keep]
        _ran_on_every_layer(model, attngen_runs, 1)
        model.float().set_attn_implementation("eager")
        reference = model(input_ids=ids, attention_mask=mask).logits.float()[keep]
        model.to(torch.bfloat16)
    fell_back = [r.message for r in caplog.records if "falling back" in r.message]
    assert not fell_back, fell_back
    rel = lambda x: ((x - reference).norm() / reference.norm()).item()  # noqa: E731
    with capsys.disabled():
        print(f"\n{family} {side}-padded: logits vs fp32 eager: attngen bf16 {rel(got):.2e}, "
              f"eager bf16 {rel(eager):.2e}")
    assert rel(got) <= 1.5 * rel(eager) + 2e-3
