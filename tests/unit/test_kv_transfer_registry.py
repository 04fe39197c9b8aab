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
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="'nccl'.*cupy"):
            get_backend("nccl")
    else:
        pytest.skip("cupy is installed")


def test_transport_flags():
    from kv_transfer.registry import transport_info

    flags = {name: (transport_info(name).same_node_only, transport_info(name).needs_cuda) for name in known_backends()}
    assert flags == {
        "fake": (True, False),
        "shm": (True, False),
        "gloo": (False, False),
        "cuda_ipc": (True, True),
        "nccl": (False, True),
    }
    with pytest.raises(ValueError, match="known: cuda_ipc, fake, gloo, nccl, shm"):
        transport_info("rdma")


@pytest.mark.parametrize("name", ["shm", "gloo", "cuda_ipc", "nccl"])
def test_registry_names_the_backend_it_loads(name):
    try:
        backend = get_backend(name)
    except ImportError:
        pytest.skip(f"{name} cannot load here")
    assert backend.name == name


def test_names_and_flags_import_nothing():
    code = textwrap.dedent("""
        import sys
        from kv_transfer.registry import known_backends, transport_info
        assert transport_info("shm").same_node_only and len(known_backends()) == 5
        assert "torch" not in sys.modules and not any(m.startswith("kv_transfer.") and m != "kv_transfer.registry"
                                                      for m in sys.modules), sorted(sys.modules)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
