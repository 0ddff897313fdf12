"""The pooling routes of an embedding server: OpenAI's `/v1/embeddings`, `/classify` (SGLang's and vLLM's shape:
label probabilities per input from a `*ForSequenceClassification` head) and `/v1/rerank` (query + documents ->
relevance scores, from a classifier with one label, as a cross-encoder).

Each input is one engine request (`TokenizerManager.encode`); a body's inputs run at once and are answered in
order. `/v1/embeddings` also takes multimodal items `{"text": ..., "image": url}` (tokenizer/embedding_input.py),
a list of them batched as any other list. A generative server answers these routes with a 400, as an embedding
server answers generation.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
import uuid
from typing import Any

import numpy as np

from mmserve.config import architectures_of
from mmserve.layers.pooler import shorten
from mmserve.messages import TokenOutput
from mmserve.multimodal.inputs import to_wire
from mmserve.multimodal.tower_inputs import TWO_TOWER_ARCHITECTURES, TowerInputs
from mmserve.server.errors import APIError
from mmserve.server.protocol import ClassifyRequest, EmbeddingRequest, RerankRequest
from mmserve.tokenizer.embedding_input import check_item, is_item, item_conversation
from mmserve.tokenizer.manager import TokenizerManager

Input = str | list[int] | dict[str, Any]  # a text, token ids, or a multimodal item


class EmbeddingServing:
    def __init__(self, manager: TokenizerManager, model_name: str):
        self.manager = manager
        self.model_name = model_name
        config = manager.hf_config
        self.text_config = getattr(config, "text_config", None) or config
        self.is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures_of(config))
        self.towers: TowerInputs | None = None  # a two-tower embedder's (CLIP's) images
        if TWO_TOWER_ARCHITECTURES.intersection(architectures_of(config)):
            from mmserve.models.loader import resolve_model_path, split_gguf

            args = manager.args
            self.towers = TowerInputs(args, split_gguf(resolve_model_path(args.model_path, args.revision))[0])

    # ----- routes -----

    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        self._require_embedding()
        if body.dimensions is not None:
            size = self._vector_size()
            if not 1 <= body.dimensions <= size:
                raise APIError(400, f"dimensions must be in [1, {size}] (the model's embedding size), got "
                                    f"{body.dimensions}", param="dimensions")
        inputs = _as_inputs(body.input)
        outputs = await self._run(body.rid, inputs)
        data = []
        for i, out in enumerate(outputs):
            vector = out.embedding if body.dimensions is None else shorten(out.embedding, body.dimensions)
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(out.prompt_tokens for out in outputs)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        self._require_classifier()
        given = [x for x in (body.input, body.text, body.messages) if x is not None]
        if len(given) != 1:
            raise APIError(400, "give exactly one of input, text and messages", param="input")
        if body.messages is not None:
            inputs = await self._conversations(body.messages)
        else:
            inputs = _as_inputs(given[0])
        outputs = await self._run(body.rid, inputs)
        labels = self._labels()
        data = []
        for i, out in enumerate(outputs):
            probs = _probabilities(out.embedding)
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": i, "label": labels[best], "probs": probs, "num_classes": len(probs),
                         "logits": out.embedding})
        tokens = sum(out.prompt_tokens for out in outputs)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": self.model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}

    async def rerank(self, body: RerankRequest) -> dict[str, Any]:
        self._require_classifier()
        if self._vector_size() != 1:
            raise APIError(400, f"{self.manager.args.model_path} has {self._vector_size()} labels: reranking needs a "
                                "classifier with one (a cross-encoder's relevance score); use /classify")
        if not body.documents:
            raise APIError(400, "documents must not be empty", param="documents")
        if body.top_n is not None and body.top_n < 1:
            raise APIError(400, f"top_n must be >= 1, got {body.top_n}", param="top_n")
        tokenizer = self.manager.tokenizer
        loop = asyncio.get_running_loop()
        # the query and each document as the tokenizer encodes a pair (its pair template, as a cross-encoder's)
        inputs = await asyncio.gather(*(loop.run_in_executor(
            self.manager.tokenize_pool, lambda d=doc: tokenizer(body.query, d)["input_ids"]) for doc in body.documents))
        outputs = await self._run(None, list(inputs))
        results = [{"index": i, "relevance_score": _sigmoid(out.embedding[0]),
                    **({"document": {"text": body.documents[i]}} if body.return_documents else {})}
                   for i, out in enumerate(outputs)]
        results.sort(key=lambda r: -r["relevance_score"])
        tokens = sum(out.prompt_tokens for out in outputs)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": self.model_name, "results": results[: body.top_n],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ----- shared -----

    async def _run(self, rid: str | None, inputs: list[Input]) -> list[TokenOutput]:
        """Tokenize the texts (render and process the items, all at once), send every input at once, and return
        their outputs in order. When one fails (or the client leaves) the others are cancelled, which aborts them
        in the engine."""
        base = rid or uuid.uuid4().hex
        prepared = await asyncio.gather(*(self._prepare(x, f"input[{i}]") for i, x in enumerate(inputs)))
        for i, (ids, _) in enumerate(prepared):
            if not ids:
                raise APIError(400, f"input[{i}] is empty after tokenization", param="input")
        tasks = [asyncio.ensure_future(self.manager.encode(base if len(prepared) == 1 else f"{base}-{i}", ids, mm))
                 for i, (ids, mm) in enumerate(prepared)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _prepare(self, value: Input, where: str) -> tuple[list[int], Any]:
        """One input as (token ids, wire media inputs or None). An item is one user turn through the chat
        template, its image prepared by the model's processor; a two-tower embedder's item is its text or its
        image alone."""
        if isinstance(value, str):
            return await self.manager.encode_async(value), None
        if not is_item(value):
            return value, None
        try:
            check_item(value, where)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from exc
        image = value.get("image")
        if image is not None and not isinstance(image, str):
            raise APIError(400, f"{where}.image must be a URL (http, data or an allowed path)", param="input")
        if self.towers is not None:
            return await self._tower_input(value, where)
        if image is not None and self.manager.mm_processor is None:
            raise APIError(400, f"{where}: {self.model_name} is a text embedder: it takes no images", param="input")
        if self.manager.chat_template is None:
            raise APIError(400, f"{where}: an embedding item is rendered by the chat template, and this model has "
                                "none (start the server with --chat-template, e.g. gme-qwen2-vl)", param="input")
        try:
            text = await self.manager.render_chat_async(item_conversation(value))
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from exc
        if image is None:
            return await self.manager.encode_async(text, add_special_tokens=False), None
        return await self.manager.process_media(text, [("image", image)])

    async def _tower_input(self, item: dict[str, Any], where: str) -> tuple[list[int], Any]:
        """A two-tower embedder's item: its text tokenized as it is, or its image as a one-token request."""
        if item.get("image") is None:
            return await self.manager.encode_async(item["text"]), None
        if item.get("text"):
            raise APIError(400, f"{where}: {self.model_name} embeds a text or an image, not both in one input",
                           param="input")
        loop = asyncio.get_running_loop()
        try:
            ids, mm = await loop.run_in_executor(self.manager.mm_pool, self.towers.image, item["image"], where)
        except ValueError as exc:  # MediaError: a bad URL, a refused address, not an image
            raise APIError(400, str(exc), param="input") from exc
        return ids, to_wire(mm)

    async def _conversations(self, messages: list[Any]) -> list[list[int]]:
        """One conversation or a list of them, each rendered by the chat template as it stands (no generation
        prompt: the reward model scores the last turn) and tokenized as a chat prompt."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        inputs = []
        for i, conversation in enumerate(conversations):
            if not conversation:
                raise APIError(400, f"messages[{i}] is an empty conversation", param="messages")
            text = await self.manager.render_chat_async(conversation, add_generation_prompt=False)
            inputs.append(await self.manager.encode_async(text, add_special_tokens=False))
        return inputs

    def _require_embedding(self) -> None:
        if not self.manager.is_embedding:
            raise APIError(400, f"{self.manager.args.model_path} is served as a generative model: it has no "
                                "embeddings (start the server with --is-embedding for an embedding model)")

    def _require_classifier(self) -> None:
        self._require_embedding()
        if not self.is_classifier:
            raise APIError(400, f"{self.manager.args.model_path} is an embedding model, not a classifier (a "
                                "*ForSequenceClassification checkpoint): use /v1/embeddings")

    def _vector_size(self) -> int:
        config = self.manager.hf_config
        if self.towers is not None:  # both towers project into the shared space
            return config.projection_dim
        return config.num_labels if self.is_classifier else self.text_config.hidden_size

    def _labels(self) -> list[str]:
        id2label = getattr(self.manager.hf_config, "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(self._vector_size())]


def _as_inputs(value: Any, param: str = "input") -> list[Input]:
    """OpenAI's input shapes as a list of texts, token-id lists or items: a string, a list of strings, token ids,
    a list of token-id lists, an item or a list of items."""
    if isinstance(value, (str, dict)):
        value = [value]
    elif value and isinstance(value[0], int):
        value = [value]
    if not value:
        raise APIError(400, f"{param} must not be empty", param=param)
    for i, item in enumerate(value):
        if len(item) == 0:
            raise APIError(400, f"{param}[{i}] is empty", param=param)
    return list(value)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _probabilities(logits: list[float]) -> list[float]:
    """Label probabilities: softmax over several labels, the sigmoid of a single one."""
    if len(logits) == 1:
        return [_sigmoid(logits[0])]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]
