import subprocess
import sys
import textwrap

import pytest

from kv_transfer.registry import get_backend, known_backends


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match="known: cuda_ipc, fake, gloo, nccl, shm"):
        get_backend("rdma")
    assert set(known_backends()) == {"fake", "shm", "gloo", "cuda_ipc", "nccl"}


def test_backends_import_lazily():
    code = textwrap.dedent("""
        import sys
        from kv_transfer.registry import get_backend
        loaded = lambda: sorted(m for m in sys.modules if m.startswith("kv_transfer."))
        assert not any(m in sys.modules for m in ("kv_transfer.shm", "kv_transfer.gloo",
                       "kv_transfer.cuda_ipc", "kv_transfer.nccl_cupy", "cupy")), loaded()
        assert get_backend("fake").name == "fake"
        assert "kv_transfer.shm" not in sys.modules and "kv_transfer.gloo" not in sys.modules
        assert get_backend("shm").name == "shm"
        assert "kv_transfer.gloo" not in sys.modules and "cupy" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_optional_dependency_is_an_import_error():
    pytest.importorskip("kv_transfer.registry")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="'nccl'.*cupy"):
            get_backend("nccl")
    else:
        pytest.skip("cupy is installed")
