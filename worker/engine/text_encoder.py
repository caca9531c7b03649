"""The text encoder as one CUDA graph.

Z-Image pads every prompt to 512 tokens and takes the Qwen3 encoder's second-to-last hidden state: a
few milliseconds of compute on a GPU, yet the eager call spends many times that in Python launching the
layers' small kernels one by one. The shape never changes, so the layers up to the one the pipeline
reads are captured once as a CUDA graph and replayed per prompt (the gain: docs/performance.md).

`TextEncoderGraph.encode` computes exactly what `ZImagePipeline._encode_prompt` does (same chat
template, padding, causal mask over the padded prompt, same layers); `install` routes the pipeline's
single-prompt calls through it and leaves every other call (several prompts, given embeddings) to
diffusers. Only for a text encoder resident on the GPU: hooks that move weights cannot be captured.
"""
from __future__ import annotations

import types

import torch

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default, which the worker always uses


def _decoder(text_encoder):
    """The Qwen3 decoder stack (a bare Qwen3Model, or one wrapped with a head)."""
    return getattr(text_encoder, "model", text_encoder)


class TextEncoderGraph:
    def __init__(self, text_encoder, length: int = MAX_SEQUENCE_LENGTH):
        self.decoder = _decoder(text_encoder)
        # hidden_states[-2] is the output of the second-to-last layer, before the final norm: the last
        # layer's work would be thrown away.
        self.layers = list(self.decoder.layers)[:-1]
        self.length = length
        self.graph = None
        self._ids = self._mask = self._out = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pipeline's hidden_states[-2], eagerly (this is what gets captured)."""
        hidden = self.decoder.embed_tokens(input_ids)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        rotary = self.decoder.rotary_emb(hidden, positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def capture(self, device) -> None:
        """Record the graph for one prompt of `length` tokens (two eager warm-up runs first, on a side
        stream, as CUDA graph capture requires)."""
        self._ids = torch.zeros(1, self.length, dtype=torch.long, device=device)
        self._mask = torch.ones(1, self.length, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(self._ids, self._mask)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self.forward(self._ids, self._mask)
        self.graph = graph

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.graph is None or tuple(input_ids.shape) != tuple(self._ids.shape):
            return self.forward(input_ids, attention_mask)
        self._ids.copy_(input_ids)
        self._mask.copy_(attention_mask)
        self.graph.replay()
        return self._out.clone()   # the next replay overwrites the graph's output


def install(pipe, capture: bool = True) -> TextEncoderGraph:
    """Route `pipe`'s single-prompt encoding through a TextEncoderGraph (captured when `capture` and
    the text encoder is on a CUDA device). Returns it."""
    runner = TextEncoderGraph(pipe.text_encoder)
    device = next(pipe.text_encoder.parameters()).device
    if capture and device.type == "cuda":
        runner.capture(device)
    original = pipe._encode_prompt

    def _encode_prompt(self, prompt, device=None, prompt_embeds=None, max_sequence_length=MAX_SEQUENCE_LENGTH):
        single = isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1)
        if prompt_embeds is not None or not single or max_sequence_length != runner.length:
            return original(prompt, device=device, prompt_embeds=prompt_embeds,
                            max_sequence_length=max_sequence_length)
        text = prompt if isinstance(prompt, str) else prompt[0]
        # As ZImagePipeline._encode_prompt (diffusers 0.42) prepares it.
        templated = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                       add_generation_prompt=True, enable_thinking=True)
        tokens = self.tokenizer([templated], padding="max_length", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt")
        device = device or self._execution_device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = runner(ids, mask)
        return [hidden[0][mask[0].bool()]]

    pipe._encode_prompt = types.MethodType(_encode_prompt, pipe)
    return runner
