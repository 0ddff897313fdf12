"""mmserve: a fast serving engine for vision-language models and text LLMs."""

__version__ = "0.1.0"

__all__ = ["Engine", "ModelRegistry", "ServerArgs", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Engine pulls in torch and transformers; import it only when asked for. ModelRegistry too: the API process
    # imports no model package (it finds a family's processor side by architecture name, multimodal/processors/).
    if name == "ModelRegistry":
        from mmserve.models.registry import ModelRegistry

        return ModelRegistry
    if name == "Engine":
        from mmserve.engine import Engine

        return Engine
    if name == "ServerArgs":
        from mmserve.config import ServerArgs

        return ServerArgs
    if name == "SamplingParams":
        from mmserve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
