"""The policy layer must import with torch, numpy and simpy unavailable."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_without_torch_numpy_simpy():
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "numpy", "simpy", "pandas", "yaml"}:
                    raise ImportError(f"blocked: {name}")
                return None
        sys.meta_path.insert(0, Block())
        import sagellm.core as core
        from sagellm.core import Scheduler, KVCacheManager, SchedulerLimits, Request, SamplingParams
        s = Scheduler(KVCacheManager(4, 4), SchedulerLimits(max_num_seqs=2, max_num_batched_tokens=8,
                                                              max_model_len=16))
        s.add_request(Request("a", [1, 2, 3], SamplingParams(max_new_tokens=1), 0.0))
        out = s.schedule(0.0)
        assert out.scheduled[0].token_ids == (1, 2, 3)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "numpy", "simpy"})
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_core_sources_import_only_stdlib_and_core():
    import ast

    allowed_roots = set(sys.stdlib_module_names) | {"sagellm"}
    for path in (ROOT / "sagellm" / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed_roots, f"{path}: imports {name}"
                if name.startswith("sagellm."):
                    assert name.startswith("sagellm.core"), f"{path}: imports {name} outside the core"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert not (node.value.id == "time" and node.attr in {"time", "monotonic", "perf_counter"}), (
                    f"{path}: reads the clock; time must be an argument"
                )
