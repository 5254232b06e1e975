"""Shared fixtures: tiny random CLIP models and batches, built in code so tests need no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

# The test models are tiny: one thread is as fast, and immune to OpenMP stalls on a busy machine.
torch.set_num_threads(1)

VOCAB = 99


def tiny_clip_config(hidden: int = 32, intermediate: int = 48) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=4,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )


def make_tiny_clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def make_batch(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, VOCAB, (n, 7), generator=generator),
        "pixel_values": torch.randn(n, 3, 16, 16, generator=generator),
    }


NO_CUDA = "no CUDA device: torch.cuda.is_available() is False"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""Parameters of the tests that run on every device: the CPU always, CUDA where torch sees a GPU (skipped else)."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def layers_of(model, adapter_name: str = "default") -> dict:
    """The model's SPU layers holding `adapter_name`, by their name in the adapter file (`naming.spu_layers`)."""
    from spu_peft.naming import spu_layers

    return dict(spu_layers(model, adapter_name))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.fixture
def tiny_clip() -> CLIPModel:
    return make_tiny_clip()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A barely pretrained embedded CLIP saved to disk: enough to exercise the benchmarks, not to learn."""
    from spu_peft.embedded import pretrain_embedded_clip

    path = tmp_path_factory.mktemp("model")
    pretrain_embedded_clip(path, max_steps=1, limit=64)
    return str(path)


# ---- kills of a sequence run ---------------------------------------------------------------------------------------


class Crash(BaseException):
    """What a kill looks like to the code under test: nothing after it runs (not an Exception, so nothing
    catches it)."""


KILL_POINTS = {
    "adapter_saved": ("hooks", "replace_folder", "after"),  # a task adapter in place (end_task), not evaluated
    "trained": ("sequence", "task_accuracies", "before"),  # a task trained, not yet evaluated
    "checkpointed": ("sequence", "write_checkpoint", "after"),
    "outputs_written": ("sequence", "write_outputs", "after"),  # results written after a run, more runs to come
}
"""Where a run's progress is tested for kills: the step (a name in a module of `spu_peft.continual`) a kill comes
before or after."""


def stop_at(monkeypatch, on_point) -> None:
    """Call `on_point(point, args)` at every kill point of the engine (it may raise `Crash` to kill the run)."""
    import importlib

    for point, (module_name, name, when) in KILL_POINTS.items():
        module = importlib.import_module(f"spu_peft.continual.{module_name}")
        real = getattr(module, name)

        def wrapped(*args, _real=real, _point=point, _when=when, **kwargs):
            if _when == "before":
                on_point(_point, args)
            result = _real(*args, **kwargs)
            if _when == "after":
                on_point(_point, args)
            return result

        monkeypatch.setattr(module, name, wrapped)


# ---- a short sequence on a barely pretrained embedded model --------------------------------------------------------

SMALL_SEQUENCE = dict(
    num_tasks=2,
    epochs=1,
    batch_size=16,
    replay_batch_size=16,
    buffer_size=16,
    max_train_per_task=32,
    max_test_per_task=16,
    max_reference=32,
    numerics="native",  # the pins are tested in test_continual and the sequence notebook
)
"""`SequenceSettings` fields of the tests' short sequences: 2 tasks, 1 epoch, 32 images per task."""


@pytest.fixture(scope="session")
def small_sequence(tiny_model):
    """(model, processor, data) of the short sequence: Animal-Shape tasks, a small control set, reference data."""
    from spu_peft.continual import SequenceSettings, prepare_sequence_data
    from spu_peft.embedded import load_animal_shapes, load_embedded_processor, load_pretraining_data

    model, processor = CLIPModel.from_pretrained(tiny_model).eval(), load_embedded_processor(tiny_model)
    splits = load_animal_shapes(seed=0)
    pretraining = load_pretraining_data(seed=0, rendered_per_class=12, control_per_class=2, animals_per_class=0)
    settings = SequenceSettings(**SMALL_SEQUENCE)
    data = prepare_sequence_data(
        splits["train"],
        splits["test"],
        processor,
        settings,
        control=pretraining["control"],
        reference=pretraining["train"],
    )
    return model, processor, data


def sequence_numbers(results: dict) -> dict:
    """Per method: its accuracy matrix, control accuracies and trainable parameter count (what resumes must keep)."""
    return {name: (r["acc_matrix"], r["control_acc"], r["trainable_params"]) for name, r in results.items()}


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this one process: DDP and FSDP can wrap a model here, in pytest's own process."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
