"""attngen.generate.sass on SASS written by hand in nvdisasm's format: which loop is the key
loop, and which stores count (no compiler needed)."""
import pytest

from attngen.generate.sass import element_store, key_loop, opcode

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
