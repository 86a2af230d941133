"""attngen.generate.sass on SASS written by hand in nvdisasm's format: which loop is the key
loop, and which stores count (no compiler needed)."""
import pytest

from attngen.generate.sass import element_store, key_loop, matmul, opcode, schedule, spills

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
.L_x_2:
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/                   STSM.16.M88.4 [R18], R4 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R40, R4, gdesc[UR8], R40 ;
        /*0050*/               @P0 BRA `(.L_x_2) ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
        /*0070*/                   STS.128 [R2], R8 ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
        /*00a0*/                   BRA `(.L_x_2) ;
"""


def test_the_key_loop_is_the_innermost_matmul_loop_before_the_last_exit():
    # the slow path past EXIT branches back to .L_x_2 but is no loop; .L_x_1 holds .L_x_2
    assert key_loop(SASS) == ["MUFU.EX2 R3, R3", "STSM.16.M88.4 [R18], R4",
                              "HGMMA.64x128x16.F32.BF16 R40, R4, gdesc[UR8], R40", "@P0 BRA `(.L_x_2)"]


def test_element_stores_are_sts_of_any_width_but_not_matrix_stores():
    assert opcode("@P0 STS.U16 [R3], R5") == "STS.U16"
    assert element_store("@!P2 STS.U16 [R3], R5") and element_store("STS.128 [R2], R8")
    assert not element_store("STSM.16.M88.4 [R18], R4") and not element_store("LDS.128 R4, [R2]")


def test_sass_without_a_matmul_loop_is_refused():
    with pytest.raises(ValueError, match="no loop"):
        key_loop(SASS.replace("HGMMA", "FFMA"))
    with pytest.raises(ValueError, match="no EXIT"):
        key_loop("        /*0000*/                   NOP ;\n")


# two matmul loops; the second, which runs more matmuls, spins on a load's barrier inside
LOOPS = """
.L_x_1:
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, gsb0 ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0030*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ;
.L_x_3:
        /*0040*/              @!P0 BRA `(.L_x_3) ;
        /*0050*/                   STL [R1], R24 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   FSEL R4, R4, -INF , P1 ;
        /*00a0*/                   FSEL R5, R5, -INF , P2 ;
        /*00b0*/                   MUFU.EX2 R4, R4 ;
        /*00c0*/                   FADD R6, R4, R5 ;
        /*00d0*/              @P1 STS.U16 [R3], R5 ;
        /*00e0*/                   LDL R24, [R1] ;
        /*00f0*/               @P2 BRA `(.L_x_2) ;
        /*0100*/                   EXIT ;
"""


def test_of_several_matmul_loops_the_key_loop_runs_the_most_matmuls():
    loop = key_loop(LOOPS)
    assert loop[0].startswith("SYNCS") and loop[-1] == "@P2 BRA `(.L_x_2)"    # the spin inside does not count


def test_the_schedule_names_the_loops_work_in_order():
    assert schedule(key_loop(LOOPS)) == "load, spill, mma x2, wait1, sel x2, exp, sts, spill"
    assert schedule(key_loop(LOOPS)[:1]) == "load"


def test_spills_count_local_memory_accesses():
    assert spills(LOOPS) == 2 and spills(SASS) == 0


def test_a_warps_matmul_steps_count_too():
    small = LOOPS.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;", "HMMA.16816.F32.BF16 R24, R4, R8, RZ ;")
    assert matmul("HMMA.16816.F32.BF16 R24, R4, R8, RZ") and matmul("@P0 HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ")
    assert not matmul("FFMA R1, R2, R3, R4")
    assert schedule(key_loop(small)).startswith("load, spill, mma x2, wait1")
