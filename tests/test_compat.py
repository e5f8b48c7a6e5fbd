"""The torchvision guard: needed on CPU-only torch with the CUDA torchvision wheel, a no-op elsewhere."""
import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_guard_makes_torchvision_importable():
    r = run("""
        from mmebm.compat import import_torchvision, guard_torchvision
        import torch
        tv = import_torchvision()
        from torchvision import transforms, utils
        x = transforms.Resize(14, antialias=True)(torch.rand(3, 28, 28))
        assert x.shape == (3, 14, 14)
        assert utils.make_grid(torch.zeros(2, 3, 4, 4), nrow=2, padding=0).shape == (3, 4, 8)
        assert guard_torchvision() is False   # second call never re-declares
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_guard_is_needed_exactly_when_native_ops_fail():
    # Without the guard, the plain import must fail exactly when the native library does not load.
    probe = run("from mmebm.compat import torchvision_native_ops_load; print(torchvision_native_ops_load())")
    assert probe.returncode == 0, probe.stderr
    native = probe.stdout.strip() == "True"
    plain = run("import torchvision")
    assert (plain.returncode == 0) == native, plain.stderr[-500:]
    if not native:
        assert "torchvision::nms" in plain.stderr


def test_guard_is_a_no_op_when_the_operators_exist():
    # Pretend the real operators are registered: the guard must not declare them again (that would raise).
    r = run("""
        import torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from mmebm import compat
        assert compat.guard_torchvision() is False and compat._TORCHVISION_SCHEMAS is None
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
