"""What the generator emits, checked by behaviour: the kernel's signature is the declared
parameter list, the launcher passes exactly those arguments, the constants a kernel runs with
are the spec's, and — simulated in Python from the generated source itself — the KV blocks a
query tile visits (forward, dQ) hold every key its rows see, the query tiles a dK/dV key block
visits hold every row that sees one of its keys, no block or tile left unmasked holds a hidden
pair, and the mask applied where one is needed is exactly the visible one."""
import ast
import functools
import gc
import itertools
import math
from dataclasses import replace

import pytest
import torch

from attngen.core import version
from attngen.core.mask import Mask
from attngen.core.tuning import DEFAULT_ARCH, DQ, Tiles, tiles_for
from attngen.core.variant import Features, KernelSpec
from attngen.generate import codegen
from attngen.generate.cases import cases_for


def kernel(mask=Mask(True, 4095), gqa=4, head_dim=128, dtype="fp16", tiles=None, **features):
    return KernelSpec.tuned(mask, gqa, head_dim, dtype, Features(**features), tiles)


@functools.lru_cache(maxsize=4)
def _module(name, spec) -> ast.Module:
    # The simulations below read each module several times.  ``name`` keys the cache with the
    # spec: it also covers the backward tiles and the templates.  The parse makes many objects,
    # and the garbage collections they would start (through all of torch's) cost more than it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(codegen.render(spec)["kernel.py"])
    finally:
        if collecting:
            gc.enable()


def kernel_module(spec) -> ast.Module:
    """The generated kernel module, parsed."""
    return _module(spec.name, spec)


def kernel_function(spec, suffix="") -> ast.FunctionDef:
    """One kernel of the generated module (``suffix``: see KernelSpec.kernels)."""
    tree = kernel_module(spec)
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == spec.name + suffix]
    return fn


def constants(spec) -> dict:
    """The module-level constants of the generated kernel."""
    tree = kernel_module(spec)
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
                chunked=True, varlen=True),
         kernel(Mask(True, 1023), 2, 256, "bf16", Tiles(128, 128, 1, 1, worker_warps=8))]


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
    launched = {}
    for call in ast.walk(launcher):       # ct.launch(stream, grid, kernel["_fwd"], args)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "ct.launch":
            suffix = ast.literal_eval(call.args[2].slice)
            launched[suffix] = [ast.unparse(e) for e in (args if suffix == "" else call.args[3]).elts]
    (table,) = [n.value for n in launcher.body if isinstance(n, ast.Assign) and n.targets[0].id == "KERNELS"]
    table = {ast.literal_eval(width): {ast.literal_eval(k): ast.unparse(v) for k, v in zip(d.keys, d.values)}
             for width, d in zip(table.keys, table.values)}
    narrow = [s for s in spec.kernels if not s.endswith("_i64")]
    assert sorted(launched) == sorted(narrow)
    assert table == {wide: {s: (f"prebuilt(generated.{spec.name}{s}{'_i64' if wide else ''}, "
                                f"'{s}{'_i64' if wide else ''}', SPEC, __file__)") for s in narrow}
                     for wide in (False, True)}
    for suffix, params in spec.kernels.items():
        fn = kernel_function(spec, suffix)
        assert [a.arg for a in fn.args.args] == [p.name for p in params]
        annotated = {a.arg: ast.unparse(a.annotation) for a in fn.args.args if a.annotation is not None}
        assert annotated == {p.name: "float" if p.kind == "f32" else "ct.IndexedWithInt64"
                             for p in params if p.kind in ("f32", "io64", "rows64", "acc64")}
        assert suffix.endswith("_i64") == any(p.kind.endswith("64") for p in params)
        assert launched[suffix.removesuffix("_i64")] == [p.arg for p in params]
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        assert {p.name for p in params} <= names     # every parameter is used


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_grids_fold_the_batch_head_pairs_over_y_and_z(spec):
    """Every launch's grid is launch_grid(tiles, pairs): tiles on x, the (batch, head) pairs
    folded over y and z, as a grid's y axis holds only 65535 programs, fewer than B x H can be
    (1100 sequences x 64 heads).  Each kernel reads its pair back as bid(1) + bid(2) * ny and
    returns at once past the last pair."""
    launcher = ast.parse(codegen.render(spec)["launcher.py"])
    grids = [ast.unparse(n.value) for n in ast.walk(launcher)
             if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "grid"]
    grids += [ast.unparse(c.args[1]) for c in ast.walk(launcher) if isinstance(c, ast.Call)
              and ast.unparse(c.func) == "ct.launch" and ast.unparse(c.args[1]) != "grid"]
    # inference, training forward, the two-kernel backward and, where the head dim has it, the fused one
    assert len(grids) == (7 if spec.fused_tiles else 4)
    for grid in grids:
        call = ast.parse(grid, mode="eval").body
        assert ast.unparse(call.func) == "launch_grid" and "heads" in ast.unparse(call.args[1]), grid
    for suffix in spec.kernels:
        fn = kernel_function(spec, suffix)
        forward = suffix.removesuffix("_i64") in ("", "_fwd")
        tile, pair = ("kb", "batch_kv_head") if suffix.removesuffix("_i64") in ("_dkdv", "_bwd") else \
            ("tile", "batch_pack" if forward and spec.tiles.pack > 1 else "batch_head")
        text = ast.unparse(fn)
        assert f"{tile} = ct.bid(0)" in text and f"{pair} = ct.bid(1) + ct.bid(2) * ct.num_blocks(1)" in text
        guard = next(n for n in fn.body if isinstance(n, ast.If) and pair in ast.unparse(n.test))
        assert ast.unparse(guard.test).startswith(f"{pair} >= ") and isinstance(guard.body[0], ast.Return)


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
    assert (c["BWD_M"], c["BWD_N"]) == (spec.dkdv_tiles.block_m, spec.dkdv_tiles.block_n)
    assert (c["DQ_M"], c["DQ_N"]) == (spec.dq_tiles.block_m, spec.dq_tiles.block_n)
    fused = spec.fused_tiles
    assert (c.get("FUSED_M"), c.get("FUSED_N")) == ((fused.block_m, fused.block_n) if fused else (None, None))
    cap = spec.features.softcap
    assert c.get("SOFTCAP_LOG2") == (None if cap is None else pytest.approx(cap * math.log2(math.e)))
    fn = kernel_function(spec)
    decorator = fn.decorator_list[0]
    assert {k.arg: ast.literal_eval(k.value) for k in decorator.keywords} == \
        {"occupancy": t.occupancy, "num_ctas": t.num_ctas,
         **({"num_worker_warps": t.worker_warps} if t.worker_warps else {})}
    calls = {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    assert ("ct.tanh" in calls) == (cap is not None)


def test_generated_test_lists_the_variant_cases():
    spec = kernel(Mask(True, 127), gqa=8, head_dim=64)
    tree = ast.parse(codegen.render(spec, ("sm_80", "sm_90"))[f"test_{spec.name}.py"])
    env = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "CASES":
            from attngen.generate.cases import Case
            env["CASES"] = eval(compile(ast.Expression(node.value), "<cases>", "eval"), {"Case": Case})
    assert env["CASES"] == cases_for(spec)


@pytest.mark.parametrize("change", ["templates", "generator", "tileiras", "cutile"])
def test_name_depends_on_templates_generator_code_and_compiler_versions(monkeypatch, change):
    spec = kernel()
    before = spec.name
    if change == "templates":
        sources = dict(version.template_sources())
        sources["kernel.py.j2"] += "\n# changed\n"
        monkeypatch.setattr(version, "template_sources", lambda: sources)
    elif change == "generator":      # every module that shapes what is generated, one at a time
        for module in version.GENERATOR:
            sources = dict(version.generator_sources())
            sources[f"{module}.py"] += "\n# changed\n"
            monkeypatch.setattr(version, "generator_sources", lambda s=sources: s)
            version.fingerprint.cache_clear()
            assert spec.name != before, module
    elif change == "tileiras":
        assert version.tileiras_version() != "absent"      # the test env has the compiler
        monkeypatch.setattr(version, "tileiras_version", lambda: "tileiras V99.0")
    else:
        monkeypatch.setattr(version, "cutile_version", lambda: "99.0")
    version.fingerprint.cache_clear()
    try:
        assert spec.name != before
    finally:
        monkeypatch.undo()
        version.fingerprint.cache_clear()
    assert spec.name == before


def test_generator_modules_are_the_ones_codegen_reads():
    """Every attngen module the renderer imports, directly or not, is in the fingerprint."""
    import ast
    from pathlib import PurePosixPath

    package = version.PACKAGE
    seen, todo = set(), ["generate/codegen", "generate/aot"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = PurePosixPath(name).parent
                for _ in range(node.level - 1):
                    base = base.parent
                target = str(base / node.module.replace(".", "/")).removeprefix("./")
                if (package / f"{target}.py").is_file():
                    todo.append(target)
    assert seen <= set(version.GENERATOR), seen - set(version.GENERATOR)


def test_kernel_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="gqa"):
        KernelSpec.tuned(Mask(True), 0, 64, "fp16", tiles=tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="head_dim"):
        KernelSpec.tuned(Mask(True), 1, 72, "fp16", tiles=tiles_for(64, Mask(True)))
    with pytest.raises(ValueError, match="power of two"):
        Tiles(96, 64, 1, 1)
    with pytest.raises(ValueError, match="must divide gqa"):
        KernelSpec.tuned(Mask(True), 2, 64, "fp16", tiles=Tiles(128, 64, 2, 1, 4))
    with pytest.raises(ValueError, match="pack 1"):
        KernelSpec.tuned(Mask(True), 8, 64, "fp16", Features(varlen=True), Tiles(128, 64, 2, 1, 8))
    with pytest.raises(ValueError, match="dq_tiles must be Tiles"):
        replace(kernel(), dq_tiles=None)
    with pytest.raises(TypeError, match="dkdv_tiles"):      # no hidden default from the tables
        KernelSpec(Mask(True), 1, 64, "fp16", tiles_for(64, Mask(True)), fused_tiles=None,
                   dq_tiles=Tiles(64, 64, 1, 1))


# -- the KV block and query tile bounds, simulated from the generated source ----------------

class _Ct:
    """Enough of ``cuda.tile`` to run a kernel's index arithmetic in Python."""
    int32 = torch.int32
    cdiv = staticmethod(lambda a, b: -(-a // b))
    arange = staticmethod(lambda n, dtype: torch.arange(n, dtype=dtype))


cdiv = _Ct.cdiv


def _code(statements):
    return compile(ast.Module(list(statements), []), "<generated>", "exec")


def _expression(node):
    return compile(ast.Expression(node), "<generated>", "eval")


def _assignments(body, names):
    """The statements of ``body`` that assign one of ``names``, in order, compiled."""
    return _code(s for s in body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) in names)


def _loop(fn, var):
    """The kernel's ``for var in range(start, stop)`` (in other loops or not) and its compiled bounds."""
    statements, loops = list(fn.body), []
    while statements:
        s = statements.pop()
        if isinstance(s, ast.For):
            statements += s.body
            loops += [s] if ast.unparse(s.target) == var else []
    (loop,) = loops
    return loop, [_expression(a) for a in loop.iter.args]


def _masking(loop):
    """The ``if`` in a loop's body that masks the scores: its condition, the statements before
    its ``ct.where`` and the where's visibility expression, compiled; None if there is none."""
    branches = [s for s in loop.body if isinstance(s, ast.If)]
    if not branches:
        return None
    (branch,) = branches
    (where,) = [n for n in ast.walk(branch) if isinstance(n, ast.Call) and ast.unparse(n.func) == "ct.where"]
    (at,) = [k for k, s in enumerate(branch.body) if any(n is where for n in ast.walk(s))]
    return _expression(branch.test), _code(branch.body[:at]), _expression(where.args[0])


def _environment(spec):
    """What the generated statements read besides the kernel's own values: the module's integer
    constants, and enough of ``cuda.tile``."""
    consts = {k: v for k, v in constants(spec).items() if isinstance(v, int)}
    return {"ct": _Ct, "min": min, "max": max, **consts}


def tile_sizes(spec, suffix):
    """The constants that size a query tile (in positions) and a KV block of a kernel that loops
    over KV blocks: the forward (``""``) or dQ."""
    if suffix == "_dq":
        return "DQ_M", "DQ_N"
    return "POSITIONS" if spec.tiles.pack > 1 else "BLOCK_M", "BLOCK_N"


def bound_program(spec, suffix="", sizes=("BLOCK_M", "BLOCK_N")):
    """A kernel that loops over KV blocks per query tile (forward, dQ): the values of the
    constants ``sizes`` names (query positions per tile, keys per block), and ``run(tile, seq,
    seq_q)``: the generated statements that place the tile and bound its KV loop, run, with the
    loop's range, ``masked(j)``: the mask condition of block ``j``, and ``visible(j, rows)``:
    block ``j``'s keys placed by the generated statements, and what the where keeps of them."""
    fn = kernel_function(spec, suffix)
    setup = _assignments(fn.body, ("m0", "last", "unmasked_stop", "first", "unmasked_start", "cols"))
    loop, (start, stop) = _loop(fn, "j")
    masked, place_keys, visible = _masking(loop)
    consts = _environment(spec)

    def run(tile, seq, seq_q):
        env = {**consts, "tile": tile, "seq": seq, "seq_q": seq_q}
        exec(setup, env)
        blocks = range(eval(start, env), eval(stop, env))

        def keeps(j, rows):
            local = {**env, "j": j, "rows": rows}
            exec(place_keys, local)
            return eval(visible, local)
        return env, blocks, lambda j: bool(eval(masked, {**env, "j": j})), keeps
    return consts[sizes[0]], consts[sizes[1]], run


def query_tile_program(spec, suffix="_dkdv"):
    """A kernel that loops over query tiles per key block (``_dkdv``, or the fused ``_bwd``
    that also adds each tile's dQ): BWD_M, BWD_N and
    ``run(kb, seq, seq_q)``: the generated statements that place key block ``kb`` (``n0``,
    ``offset``, ``keys``, ``steps``) and bound its query-tile loop, run, with the loop's range
    and ``visit(i)``: tile ``i``'s statements run, and the visibility its ``ct.where`` computes
    (keys x rows), or None where the kernel leaves the tile unmasked."""
    fn = kernel_function(spec, suffix)
    setup = _assignments(fn.body, ("n0", "offset", "keys", "steps", "first", "last"))
    loop, (start, stop) = _loop(fn, "i")
    place = _assignments(loop.body, ("m0",))
    masking = _masking(loop)
    consts = _environment(spec)

    def run(kb, seq, seq_q):
        env = {**consts, "kb": kb, "seq": seq, "seq_q": seq_q}
        exec(setup, env)

        def visit(i):
            local = {**env, "i": i}
            exec(place, local)
            if masking is None or not eval(masking[0], local):
                return local, None
            exec(masking[1], local)
            return local, eval(masking[2], local)
        return env, range(eval(start, env), eval(stop, env)), visit
    prefix = "FUSED" if suffix == "_bwd" else "BWD"
    return consts[f"{prefix}_M"], consts[f"{prefix}_N"], run


def with_backward_tiles(spec, tiles):
    """``spec`` with dK/dV and fused-backward tiles of ``tiles``' shape and dQ tiles of the
    transposed shape, so that the dQ kernel's bounds are checked with tiles of their own."""
    return replace(spec, dkdv_tiles=Tiles(tiles.block_m, tiles.block_n, 1, 1),
                   fused_tiles=Tiles(tiles.block_m, tiles.block_n, 1, 1),
                   dq_tiles=Tiles(tiles.block_n, tiles.block_m, 1, 1))


def grid(mask, rows, keys):
    """Mask.visible on the whole grid that ``rows`` and ``keys`` broadcast to."""
    return mask.visible(rows, keys).expand(torch.broadcast_tensors(rows, keys)[0].shape)


def lengths(chunked):
    """(S_q, S_k): one row to several tiles, and, where the kernel takes a cached prefix, prefixes
    of every length mod 16 and some mod 32: the bounds compare query positions with key block
    edges, so an off-by-one shows only where a tile starts at the right distance from one."""
    prefixes = [(1, 50), (20, 100)] + [(40, 40 + p) for p in (*range(1, 16), 30, 31)]
    return [(s, s) for s in (1, 5, 16, 33, 70)] + (prefixes if chunked else [])


MASKS = [Mask(True), Mask(False)] + [Mask(True, w - 1) for w in (1, 2, 15, 16, 17, 40, 200)] + \
        [Mask(False, l, r) for l, r in ((0, 0), (3, 17), (16, 1), (31, 33), (100, 5))]
TILES = [Tiles(16, 16, 1, 1), Tiles(32, 16, 1, 1), Tiles(16, 32, 1, 1), Tiles(32, 32, 1, 1, 2)]


@pytest.mark.parametrize("chunked", [False, True], ids=["prefill", "chunked"])
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: t.tag)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.tag)
def test_visited_blocks_hold_every_visible_key_and_unmasked_blocks_no_hidden_one(mask, tiles, chunked):
    """In the forward (tiles ``tiles``) and the dQ kernel (DQ_M x DQ_N: the shape transposed)."""
    spec = with_backward_tiles(kernel(mask, gqa=2, head_dim=64, tiles=tiles, chunked=chunked), tiles)
    for suffix in ("", "_dq"):
        bm, bn, run = bound_program(spec, suffix, tile_sizes(spec, suffix))
        for seq_q, seq in lengths(chunked):
            rows = torch.arange(seq - seq_q, seq)[:, None]              # every query row's position
            keys = torch.arange(cdiv(seq, bn) * bn)[None, :]           # every key of every KV block
            truth = grid(mask, rows, keys) & (keys < seq)
            for tile in range(cdiv(seq_q, bm)):
                env, blocks, masked, visible = run(tile, seq, seq_q)
                where = f"{suffix[1:] or 'forward'} {mask.tag} {bm}x{bn} S_q={seq_q} S_k={seq} tile {tile}"
                if mask.causal or mask.left is not None:       # full bidirectional needs no position
                    assert env["m0"] == seq - seq_q + tile * bm, f"{where}: m0 {env['m0']}"
                tile_rows = slice(tile * bm, tile * bm + bm)
                sees = truth[tile_rows]
                assert set(blocks) <= set(range(cdiv(seq, bn))), f"{where}: visits blocks {blocks}"
                missed = set((keys[0, sees.any(0)] // bn).tolist()) - set(blocks)
                assert not missed, f"{where}: misses visible keys in blocks {sorted(missed)}"
                for j in blocks:
                    block = sees[:, j * bn:(j + 1) * bn]
                    if not masked(j):
                        assert block.all(), f"{where}: block {j} is left unmasked but hides keys"
                    else:
                        got = visible(j, rows[tile_rows])
                        assert torch.equal(got.expand_as(block), block), f"{where}: block {j} mask"


@pytest.mark.parametrize("suffix", ["_bwd", "_dkdv"], ids=["fused", "deterministic"])
@pytest.mark.parametrize("chunked", [False, True], ids=["prefill", "chunked"])
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t.block_m}x{t.block_n}")
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.tag)
def test_key_blocks_visit_every_query_tile_that_sees_their_keys_and_mask_exactly(mask, tiles, chunked,
                                                                                 suffix):
    """Per key block (the fused backward, and deterministic mode's dK/dV kernel), the query
    tiles [first, last) hold every row that sees one of its keys; a tile left unmasked hides no
    (row, key) pair, and a masked one is masked exactly.  Rows and keys past the sequence are
    left out: their Q, dO, K, V load as zeros and add nothing."""
    spec = with_backward_tiles(kernel(mask, gqa=2, head_dim=64, tiles=tiles, chunked=chunked), tiles)
    bm, bn, run = query_tile_program(spec, suffix)
    for seq_q, seq in lengths(chunked):
        offset = seq - seq_q
        rows = offset + torch.arange(cdiv(seq_q, bm) * bm)[None, :]    # every row of every query tile
        for kb in range(cdiv(seq, bn)):
            env, visited, visit = run(kb, seq, seq_q)
            positions = mask.causal or mask.left is not None    # full bidirectional needs none
            if positions:
                assert (env["n0"], env["offset"]) == (kb * bn, offset)
            keys = torch.arange(kb * bn, kb * bn + bn)[:, None]
            truth, real = grid(mask, rows, keys), (rows < seq) & (keys < seq)
            where = f"{suffix[1:]} {mask.tag} {bm}x{bn} S_q={seq_q} S_k={seq} key block {kb}"
            assert set(visited) <= set(range(cdiv(seq_q, bm))), f"{where}: visits tiles {visited}"
            missed = set((torch.nonzero((truth & real).any(0))[:, 0] // bm).tolist()) - set(visited)
            assert not missed, f"{where}: misses rows in tiles {sorted(missed)}"
            for i in visited:
                local, got = visit(i)
                if positions:
                    assert local["m0"] == offset + i * bm, f"{where}: tile {i} m0 {local['m0']}"
                pairs, tile_real = truth[:, i * bm:i * bm + bm], real[:, i * bm:i * bm + bm]
                if got is None:
                    assert (pairs | ~tile_real).all(), f"{where}: tile {i} is left unmasked but hides pairs"
                else:
                    assert torch.equal(got.expand_as(pairs) & tile_real, pairs & tile_real), \
                        f"{where}: tile {i} mask"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_fused_backward_adds_each_visited_tiles_dq_and_deterministic_mode_adds_nothing(spec):
    """Where the head dim has a fused backward, its kernel adds, for every query tile it visits,
    dS^T's transpose times K into the fp32 accumulator at that tile's rows of head h,
    atomically; the _pre kernel zeroes those rows and the _post kernel scales and casts them;
    the launcher runs _pre, _bwd, _post by default and _dq, _dkdv in deterministic mode.
    Elsewhere no fused kernel is generated and _dq, _dkdv always run.  The two-kernel path
    uses no atomics."""
    backward = next(n for n in ast.parse(codegen.render(spec)["launcher.py"]).body
                    if isinstance(n, ast.FunctionDef) and n.name == "backward")

    def launched(body):
        return [ast.unparse(c.args[2]) for n in body for c in ast.walk(n)
                if isinstance(c, ast.Call) and ast.unparse(c.func) == "ct.launch"]
    for suffix in ("_dq", "_dkdv"):
        assert "atomic" not in ast.unparse(kernel_function(spec, suffix))
    if not spec.fused_tiles:
        assert not {"_pre", "_bwd", "_post"} & set(spec.kernels)
        assert launched(backward.body) == ["kernel['_dq']", "kernel['_dkdv']"]
        return
    fused = ast.unparse(kernel_function(spec, "_bwd"))
    tile_rows = "(i, h, 0)" if spec.features.varlen else "(b, h, i, 0)"
    assert "dq = ct.mma(ct.transpose(ds), k, " in fused
    assert f"dq_rows.atomic_store_add({tile_rows}, dq.reshape(" in fused
    acc = "dQas" if spec.features.varlen else "dQacc"
    assert f"dq_rows = {acc}.tiled_view(" in fused
    assert "ct.store(dQacc" in ast.unparse(kernel_function(spec, "_pre")) or \
        "ct.store(dQas" in ast.unparse(kernel_function(spec, "_pre"))
    assert "* scale).astype(dQ.dtype)" in ast.unparse(kernel_function(spec, "_post"))
    branch = next(n for n in ast.walk(backward) if isinstance(n, ast.If)
                  and ast.unparse(n.test) == "deterministic")
    assert launched(branch.body) == ["kernel['_dq']", "kernel['_dkdv']"]
    assert launched(branch.orelse) == ["kernel['_pre']", "kernel['_bwd']", "kernel['_post']"]


@pytest.mark.parametrize("chunked", [False, True], ids=["prefill", "chunked"])
@pytest.mark.parametrize("mask", [Mask(True, 99), Mask(False, 40, 59)], ids=lambda m: m.tag)
def test_bounds_do_o_s_w_work(mask, chunked):
    """With a window of W keys, a tile of M query positions visits at most cdiv(M + W - 1, N) + 1
    blocks of N keys (forward, dQ), and a dK/dV block of BWD_N keys at most
    cdiv(BWD_N + W - 1, BWD_M) + 1 query tiles, whatever S."""
    spec = with_backward_tiles(kernel(mask, gqa=1, head_dim=64, tiles=Tiles(16, 16, 1, 1), chunked=chunked),
                               Tiles(16, 32, 1, 1))
    w, seq, seq_q = mask.span, 100_000, 60_000 if chunked else 100_000
    far = list(itertools.islice(itertools.count(0, 7), 40))
    for suffix in ("", "_dq"):
        bm, bn, run = bound_program(spec, suffix, tile_sizes(spec, suffix))
        for tile in far:
            _, blocks, _, _ = run(tile, seq, seq_q)
            assert 0 < len(blocks) <= cdiv(bm + w - 1, bn) + 1
    bm, bn, run = query_tile_program(spec)
    for kb in far:
        _, tiles, _ = run(kb + 2_000, seq, seq_q)
        assert 0 < len(tiles) <= cdiv(bn + w - 1, bm) + 1


def test_dq_tiles_are_their_own_and_part_of_the_name(monkeypatch):
    """The dQ tiles size and hint the dQ kernel and its grid alone (dK/dV keep theirs) and
    rename the variant; where they equal dK/dV's they leave the name as it was without them.
    A head dim without a DQ row takes its DKDV row for dQ."""
    monkeypatch.delitem(DQ[DEFAULT_ARCH], 64, raising=False)
    shared = kernel(head_dim=64)
    assert shared.dq_tiles == shared.dkdv_tiles
    spec = replace(shared, dq_tiles=Tiles(128, 32, 1, 1, worker_warps=8))
    assert spec.name != shared.name
    assert replace(spec, dq_tiles=spec.dkdv_tiles).name == shared.name
    c = constants(spec)
    assert (c["DQ_M"], c["DQ_N"]) == (128, 32)
    assert (c["BWD_M"], c["BWD_N"]) == (spec.dkdv_tiles.block_m, spec.dkdv_tiles.block_n)
    hints = {kw.arg: ast.literal_eval(kw.value)
             for kw in kernel_function(spec, "_dq").decorator_list[0].keywords}
    assert hints == {"occupancy": 1, "num_ctas": 1, "num_worker_warps": 8}
    assert "num_worker_warps" not in ast.unparse(kernel_function(spec, "_dkdv").decorator_list[0])
    launcher = codegen.render(spec)["launcher.py"]
    assert '["_dq"], ' in launcher and "launch_grid((seq + 127) // 128, batch * heads)" in launcher


def test_tiles_are_fixed_when_the_spec_is_made(monkeypatch):
    """A spec's tiles, hash and name are its own: changing the tuned tables afterwards changes
    neither them nor what is rendered (only specs made after the change take the new rows)."""
    from attngen.core import tuning

    spec = kernel(head_dim=256)
    name, source = spec.name, codegen.render(spec)["kernel.py"]
    for table, tiles in ((tuning.FUSED, None), (tuning.DKDV, Tiles(32, 32, 1, 1)),
                         (tuning.DQ, Tiles(16, 16, 1, 1))):
        if tiles is None:
            monkeypatch.delitem(table[DEFAULT_ARCH], 256)
        else:
            monkeypatch.setitem(table[DEFAULT_ARCH], 256, tiles)
    assert spec.fused_tiles is not None and spec.name == name
    assert codegen.render(spec)["kernel.py"] == source
    retuned = kernel(head_dim=256)
    assert (retuned.fused_tiles, retuned.dkdv_tiles, retuned.dq_tiles) == \
        (None, Tiles(32, 32, 1, 1), Tiles(16, 16, 1, 1))
    assert retuned.name != name and "_bwd" not in retuned.kernels


def test_every_tile_round_trips_and_old_dicts_take_the_tables():
    """as_dict / from_dict carry every kernel's tiles (a fused kernel's or None); a dict
    written before the backward's tiles were fields (an older manifest) still reads, with
    the tuned tables' tiles."""
    spec = replace(kernel(head_dim=64), fused_tiles=Tiles(32, 32, 1, 1), dq_tiles=Tiles(16, 64, 2, 1))
    for s in (spec, kernel(head_dim=64), kernel(head_dim=256)):
        again = KernelSpec.from_dict(s.as_dict())
        assert again == s and again.name == s.name
    old = {k: v for k, v in spec.as_dict().items() if k not in KernelSpec.BACKWARD_TILES}
    assert KernelSpec.from_dict(old) == kernel(head_dim=64)
