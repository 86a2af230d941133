"""What the generator emits, checked by behaviour: the kernel's signature is the declared
parameter list, the launcher passes exactly those arguments, the constants a kernel runs with
are the spec's, and — simulated in Python from the generated source itself — the KV blocks a
query tile visits hold every key its rows see, and no block it leaves unmasked holds a hidden
key."""
import ast
import itertools
import math

import pytest
import torch

from attngen import codegen, version
from attngen.cases import cases_for
from attngen.mask import Mask
from attngen.tuning import Tiles, tiles_for
from attngen.variant import Features, KernelSpec


def kernel(mask=Mask(True, 4095), gqa=4, head_dim=128, dtype="fp16", tiles=None, **features):
    return KernelSpec(mask, gqa, head_dim, dtype, tiles or tiles_for(head_dim, mask, gqa),
                      Features(**features))


def kernel_function(spec, suffix="") -> ast.FunctionDef:
    """One kernel of the generated module (``suffix``: see KernelSpec.kernels)."""
    tree = ast.parse(codegen.render(spec)["kernel.py"])
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == spec.name + suffix]
    return fn


def constants(spec) -> dict:
    """The module-level constants of the generated kernel."""
    tree = ast.parse(codegen.render(spec)["kernel.py"])
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


SPECS = [kernel(), kernel(Mask(True), gqa=1, head_dim=64), kernel(Mask(False, 3, 17), gqa=2),
         kernel(Mask(False), head_dim=80), kernel(Mask(True, 127), 8, 64, "bf16", Tiles(128, 64, 2, 1, 8)),
         kernel(Mask(False, 4, 4), 4, 128, tiles=Tiles(128, 64, 2, 1, 2)),
         kernel(Mask(True, 127), 2, 64, "bf16", Tiles(64, 64, 4, 1), softcap=50.0),
         kernel(Mask(True, 127), 2, 64, "bf16", Tiles(64, 64, 4, 1), sinks=True, chunked=True),
         kernel(Mask(True, 32), 2, 96, "bf16", Tiles(64, 64, 2, 1), softcap=30.0, sinks=True,
                chunked=True, varlen=True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_signature_and_launch_arguments_are_the_declared_params(spec):
    files = codegen.render(spec)
    for text in files.values():
        ast.parse(text)
    assert codegen.render(spec) == files                       # deterministic
    tree = ast.parse(files["kernel.py"])
    assert sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef)) == \
        sorted(spec.name + suffix for suffix in spec.kernels)
    launcher = ast.parse(files["launcher.py"])
    (args,) = [n.value for n in ast.walk(launcher)
               if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "args"]
    launched = {"": [ast.unparse(e) for e in args.elts]}
    for call in ast.walk(launcher):
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "ct.launch" \
                and ast.unparse(call.args[2]).startswith("kernel_"):
            launched[ast.unparse(call.args[2]).removeprefix("kernel")] = \
                [ast.unparse(e) for e in call.args[3].elts]
    assert set(launched) == set(spec.kernels)
    for suffix, params in spec.kernels.items():
        fn = kernel_function(spec, suffix)
        assert [a.arg for a in fn.args.args] == [p.name for p in params]
        floats = [a.arg for a in fn.args.args if a.annotation is not None]
        assert floats == [p.name for p in params if p.kind == "f32"]
        assert launched[suffix] == [p.arg for p in params]
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        assert {p.name for p in params} - {"CuK"} <= names     # used (the delta kernel needs no CuK)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_constants_are_the_spec_and_nothing_else(spec):
    c = constants(spec)
    m, t = spec.mask, spec.tiles
    assert c["HEAD_DIM"] == spec.head_dim and c["BLOCK_N"] == t.block_n
    assert c.get("TILE_D", spec.head_dim) == spec.tile_d
    assert c.get("WINDOW_LEFT") == m.left and c.get("WINDOW_RIGHT") == m.right
    assert ("PACK" in c) == (t.pack > 1)
    if t.pack > 1:
        assert c["PACK"] * c["POSITIONS"] == t.block_m
    else:
        assert c["BLOCK_M"] == t.block_m
    assert c.get("GROUP") == (spec.gqa if spec.gqa > 1 else None)      # the backward's group loop
    assert (c["BWD_M"], c["BWD_N"]) == (spec.backward_tiles.block_m, spec.backward_tiles.block_n)
    cap = spec.features.softcap
    assert c.get("SOFTCAP_LOG2") == (None if cap is None else pytest.approx(cap * math.log2(math.e)))
    fn = kernel_function(spec)
    decorator = fn.decorator_list[0]
    assert {k.arg: ast.literal_eval(k.value) for k in decorator.keywords} == \
        {"occupancy": t.occupancy, "num_ctas": t.num_ctas}
    calls = {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    assert ("ct.tanh" in calls) == (cap is not None)


def test_generated_test_lists_the_variant_cases():
    spec = kernel(Mask(True, 127), gqa=8, head_dim=64)
    tree = ast.parse(codegen.render(spec, ("sm_80", "sm_90"))[f"test_{spec.name}.py"])
    env = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "CASES":
            from attngen.cases import Case
            env["CASES"] = eval(compile(ast.Expression(node.value), "<cases>", "eval"), {"Case": Case})
    assert env["CASES"] == cases_for(spec)


def test_name_depends_on_templates(monkeypatch):
    spec = kernel()
    before = spec.name
    sources = dict(version.template_sources())
    sources["kernel.py.j2"] += "\n# changed\n"
    monkeypatch.setattr(version, "template_sources", lambda: sources)
    version.fingerprint.cache_clear()
    try:
        assert spec.name != before
    finally:
        monkeypatch.undo()
        version.fingerprint.cache_clear()
    assert spec.name == before


def test_kernel_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="gqa"):
        KernelSpec(Mask(True), 0, 64, "fp16", tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="head_dim"):
        KernelSpec(Mask(True), 1, 72, "fp16", tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="power of two"):
        Tiles(96, 64, 1, 1)
    with pytest.raises(ValueError, match="must divide gqa"):
        KernelSpec(Mask(True), 2, 64, "fp16", Tiles(128, 64, 2, 1, 4))
    with pytest.raises(ValueError, match="pack 1"):
        KernelSpec(Mask(True), 8, 64, "fp16", Tiles(128, 64, 2, 1, 8), Features(varlen=True))


# -- the KV block bounds, simulated from the generated source --------------------------------

class _Ct:
    """Enough of ``cuda.tile`` to run a kernel's scalar bound arithmetic in Python."""
    cdiv = staticmethod(lambda a, b: -(-a // b))


def bound_program(spec):
    """The generated statements that place a tile and bound its KV loop, and the loop's
    range, mask condition and visibility expression, as Python callables."""
    fn = kernel_function(spec)
    setup = [s for s in fn.body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) in
             ("m0", "last", "unmasked_stop", "first", "unmasked_start")]
    (loop,) = [s for s in fn.body if isinstance(s, ast.For)]
    (branch,) = [s for s in loop.body if isinstance(s, ast.If)]
    (where,) = [n for n in ast.walk(branch) if isinstance(n, ast.Call) and ast.unparse(n.func) == "ct.where"]
    consts = {k: v for k, v in constants(spec).items() if isinstance(v, int)}
    code = compile(ast.Module(setup, []), "<bounds>", "exec")
    start, stop = (compile(ast.Expression(a), "<range>", "eval") for a in loop.iter.args)
    masked = compile(ast.Expression(branch.test), "<masked>", "eval")
    visible = compile(ast.Expression(where.args[0]), "<visible>", "eval")

    def run(tile, seq, seq_q):
        env = {"ct": _Ct, "min": min, "max": max, "tile": tile, "seq": seq, "seq_q": seq_q, **consts}
        exec(code, env)
        blocks = range(eval(start, env), eval(stop, env))
        return env, blocks, lambda j: bool(eval(masked, {**env, "j": j})), \
            lambda rows, keys: eval(visible, {**env, "rows": rows, "keys": keys})
    return run


MASKS = [Mask(True), Mask(False)] + [Mask(True, w - 1) for w in (1, 2, 15, 16, 17, 40, 200)] + \
        [Mask(False, l, r) for l, r in ((0, 0), (3, 17), (16, 1), (31, 33), (100, 5))]
TILES = [Tiles(16, 16, 1, 1), Tiles(32, 16, 1, 1), Tiles(16, 32, 1, 1), Tiles(32, 32, 1, 1, 2)]


@pytest.mark.parametrize("chunked", [False, True], ids=["prefill", "chunked"])
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: t.tag)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.tag)
def test_visited_blocks_hold_every_visible_key_and_unmasked_blocks_no_hidden_one(mask, tiles, chunked):
    spec = kernel(mask, gqa=2, head_dim=64, tiles=tiles, chunked=chunked)
    run = bound_program(spec)
    bn, positions = tiles.block_n, tiles.positions
    lengths = [(s, s) for s in (1, 5, 16, 33, 70)]
    if chunked:
        lengths += [(1, 50), (7, 9), (20, 100), (33, 34)]
    for seq_q, seq in lengths:
        for tile in range(-(-seq_q // positions)):
            env, blocks, masked, visible = run(tile, seq, seq_q)
            first_row = seq - seq_q + tile * positions
            assert env["m0"] == first_row
            rows = [r for r in range(first_row, first_row + positions) if r < seq]
            where = f"{spec.mask.tag} {tiles.tag} S_q={seq_q} S_k={seq} tile {tile}"
            for r in rows:
                seen = [j for j in range(seq) if mask.visible(r, j)]
                assert all(j // bn in blocks for j in seen), f"{where}: row {r} misses a visible key"
            for j in blocks:
                keys = range(j * bn, j * bn + bn)
                truth = torch.tensor([[mask.visible(r, key) and key < seq for key in keys] for r in rows])
                if not masked(j):
                    assert truth.all(), f"{where}: block {j} is left unmasked but hides keys"
                else:
                    got = visible(torch.tensor(rows)[:, None], torch.tensor(list(keys))[None, :])
                    assert torch.equal(got.expand_as(truth), truth), f"{where}: block {j} mask"


def test_bounds_do_o_s_w_work():
    """A windowed tile visits at most cdiv(BLOCK_M + W - 1, BLOCK_N) + 1 blocks, whatever S."""
    mask, tiles = Mask(True, 99), Tiles(16, 16, 1, 1)
    run = bound_program(kernel(mask, gqa=2, head_dim=64, tiles=tiles))
    for tile in itertools.islice(itertools.count(0, 7), 40):
        _, blocks, _, _ = run(tile, 100_000, 100_000)
        assert len(blocks) <= -(-(16 + 100 - 1) // 16) + 1
