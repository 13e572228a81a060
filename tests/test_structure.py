"""The seams of the package: an acyclic import graph pointing one way, modules of readable size,
a loss type and a rollout backend each added by registering one thing, and the log-prob entry
points working under DistributedDataParallel.

    pytest tests/test_structure.py
"""

import ast
import json
from pathlib import Path

import pytest
import torch

from grpo_fast import losses, rollout
from grpo_fast.config import ConfigError, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grpo_fast"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def grpo_fast_imports(path: Path) -> set[str]:
    """The grpo_fast modules `path` imports (at module level or inside functions), leaving out
    `if TYPE_CHECKING:` blocks, which never run."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("grpo_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("grpo_fast"):
                found.add(target)
                # `from . import losses` imports the submodule.
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in grpo_fast_imports(path) if t in files and t != name} for name, path in files.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_point_one_way():
    graph = import_graph()
    assert not [m for m, deps in graph.items() if "grpo_fast.cli" in deps], "nothing imports the cli"
    for leaf in ("grpo_fast.losses", "grpo_fast.listwise", "grpo_fast.rewards", "grpo_fast.errors"):
        assert not graph[leaf] - {"grpo_fast.losses"}, f"{leaf} is a leaf: {graph[leaf]}"
    for trainer in ("grpo_fast.offline", "grpo_fast.online"):
        assert not {"grpo_fast.offline", "grpo_fast.online"} & graph[trainer] - {trainer}, "trainers are apart"
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert roots <= {"torch", "triton", "__future__", "math", "os", "typing", "dataclasses", "functools"}, (path, roots)


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


# ------------------------------------------------------------------------------------------
# A loss type and a rollout backend: one registration each
# ------------------------------------------------------------------------------------------

@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w}) + "\n" for w in ("ab", "cd")))
    return str(path)


def online_cfg(prompts_file, tmp_path, **online):
    return config_from_dict({
        "mode": "online", "dataset_path": prompts_file, "output_dir": str(tmp_path / "run"),
        "batch_size": 2, "max_steps": 1, "save_steps": 100, "seed": 0, "lora": {"r": 4, "alpha": 8},
        "online": {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 4,
                   "log_completions_steps": 0, "rewards": [{"name": "grpo_fast.tasks:char_match"}], **online}})


def test_a_registered_loss_type_is_selectable_and_read_by_the_step(prompts_file, tmp_path, monkeypatch):
    from grpo_fast.online import OnlineTrainer

    monkeypatch.setattr(losses, "_LOSS_TYPES", dict(losses._LOSS_TYPES))
    monkeypatch.setattr(losses, "LOSS_TYPES", losses.LOSS_TYPES)
    calls = []

    @losses.register_loss_type("token_sum")
    def _token_sum(per_token_loss, mask, max_completion_length, num_items_in_batch):
        calls.append(per_token_loss.shape)
        return per_token_loss.sum()

    with pytest.raises(ConfigError, match="online.loss_type: expected one of"):
        online_cfg(prompts_file, tmp_path, loss_type="token_summ")
    trainer = OnlineTrainer(online_cfg(prompts_file, tmp_path, loss_type="token_sum"))
    trainer.step([{"prompt": "ab=", "answer": "ab"}, {"prompt": "cd=", "answer": "cd"}])
    assert calls and calls[0][0] == 8, "the step reduced with the registered function, over every row"


def test_a_registered_rollout_backend_is_selected_by_config_and_synced_after_updates(
        prompts_file, tmp_path, monkeypatch):
    from grpo_fast.online import OnlineTrainer
    from grpo_fast.rollout.hf import HFBackend

    monkeypatch.setattr(rollout, "BACKENDS", dict(rollout.BACKENDS))
    events = []

    @rollout.register_backend("recording")
    class Recording(HFBackend):
        def generate(self, prompts, *, greedy=False, num_generations=None):
            events.append(("generate", len(prompts)))
            return super().generate(prompts, greedy=greedy, num_generations=num_generations)

        def after_update(self, model):
            events.append(("sync", model is trainer.model))

    with pytest.raises(ConfigError, match="online.generation_backend"):
        online_cfg(prompts_file, tmp_path, generation_backend="nope")
    trainer = OnlineTrainer(online_cfg(prompts_file, tmp_path, generation_backend="recording", num_iterations=2))
    assert isinstance(trainer.backend, Recording)
    trainer.step([{"prompt": "ab=", "answer": "ab"}, {"prompt": "cd=", "answer": "cd"}])
    assert events == [("generate", 2), ("sync", True), ("sync", True)], "one sync per optimizer update"


# ------------------------------------------------------------------------------------------
# DDP: the log-prob entry points reach the decoder and head through the wrapper
# ------------------------------------------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_group_logprobs_under_ddp_equal_the_plain_model_and_arm_the_allreduce(tiny_lora_model, one_rank_group,
                                                                              monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    from grpo_fast import logprobs

    model = tiny_lora_model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 3, 9), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.cat([torch.zeros(2, 3, 4), torch.ones(2, 3, 5)], dim=2).long(),
             "group_mask": torch.tensor([[True, True, True], [True, True, False]])}
    plain = logprobs.group_logprobs(model, batch, backend="chunked")
    plain.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    ddp = DistributedDataParallel(model)
    reduced = []
    real = DistributedDataParallel._pre_forward
    monkeypatch.setattr(DistributedDataParallel, "_pre_forward",
                        lambda self, *a, **k: (reduced.append(1), real(self, *a, **k))[1])
    wrapped = logprobs.group_logprobs(ddp, batch, backend="chunked")
    torch.testing.assert_close(wrapped, plain)
    assert reduced, "the forward ran through DDP, so its backward all-reduces the gradients"
    wrapped.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], msg=name)
    assert "forward" not in vars(model), "the wrapped model's forward is restored"
