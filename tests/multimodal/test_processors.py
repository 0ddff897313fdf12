"""The per-family processor registry (`mmserve/multimodal/processors/`): the API process finds every family's
processor side by architecture name without importing model code, and the registry covers exactly the models that
take media."""

import subprocess
import sys

from mmserve.models.registry import ModelRegistry
from mmserve.multimodal.processors import ProcessorRegistry


def test_resolving_every_family_imports_no_model_code():
    script = (
        "import sys\n"
        "import mmserve.multimodal.processor\n"
        "from mmserve.multimodal.processors import ProcessorRegistry\n"
        "archs = ProcessorRegistry.supported()\n"
        "assert len(archs) >= 12, archs\n"
        "assert all(ProcessorRegistry.resolve([a]) is not None for a in archs)\n"
        "print(sorted(m for m in sys.modules if m == 'mmserve.models' or m.startswith('mmserve.models.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_registry_covers_exactly_the_models_that_take_media():
    with_media = {arch for arch in ModelRegistry.supported() if hasattr(ModelRegistry.resolve([arch]), "encode")}
    assert set(ProcessorRegistry.supported()) == with_media
    assert "Qwen3VLMoeForConditionalGeneration" in with_media and "LlavaNextVideoForConditionalGeneration" in with_media
    # a text model has no processor side; the first architecture with one is taken
    assert ProcessorRegistry.resolve(["LlamaForCausalLM"]) is None
    assert ProcessorRegistry.resolve(["Gemma3ForCausalLM"]) is None
    gemma = ProcessorRegistry.resolve(["LlamaForCausalLM", "Gemma3ForConditionalGeneration"])
    assert gemma is not None and gemma.expand_placeholders_in_text
    # no model class keeps the processor side it had
    for arch in with_media:
        assert not hasattr(ModelRegistry.resolve([arch]), "multimodal_inputs"), arch
