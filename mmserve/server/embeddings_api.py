"""The pooling routes of an embedding server: OpenAI's `/v1/embeddings`, `/classify` (SGLang's and vLLM's shape:
label probabilities per input from a `*ForSequenceClassification` head) and `/v1/rerank` (query + documents ->
relevance scores, from a classifier with one label, as a cross-encoder).

Each input is one engine request (`TokenizerManager.encode`); a body's inputs run at once and are answered in
order. A generative server answers these routes with a 400, as an embedding server answers generation.
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
from mmserve.server.errors import APIError
from mmserve.server.protocol import ClassifyRequest, EmbeddingRequest, RerankRequest
from mmserve.tokenizer.manager import TokenizerManager


class EmbeddingServing:
    def __init__(self, manager: TokenizerManager, model_name: str):
        self.manager = manager
        self.model_name = model_name
        config = manager.hf_config
        self.text_config = getattr(config, "text_config", None) or config
        self.is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures_of(config))

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

    async def _run(self, rid: str | None, inputs: list[str | list[int]]) -> list[TokenOutput]:
        """Tokenize the texts, send every input at once, and return their outputs in order. When one fails (or
        the client leaves) the others are cancelled, which aborts them in the engine."""
        base = rid or uuid.uuid4().hex
        token_lists = [await self.manager.encode_async(x) if isinstance(x, str) else x for x in inputs]
        for i, ids in enumerate(token_lists):
            if not ids:
                raise APIError(400, f"input[{i}] is empty after tokenization", param="input")
        tasks = [asyncio.ensure_future(self.manager.encode(base if len(token_lists) == 1 else f"{base}-{i}", ids))
                 for i, ids in enumerate(token_lists)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

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
        return config.num_labels if self.is_classifier else self.text_config.hidden_size

    def _labels(self) -> list[str]:
        id2label = getattr(self.manager.hf_config, "id2label", None) or {}
        return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(self._vector_size())]


def _as_inputs(value: Any, param: str = "input") -> list[str | list[int]]:
    """OpenAI's input shapes as a list of texts or token-id lists: a string, a list of strings, token ids, or a
    list of token-id lists."""
    if isinstance(value, str):
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
