"""A rollout engine that returns chosen completions, to test the MASA logic through the trainer.

A random tiny model never writes JSON, so tests script what each prompt "generates": the engine
finds which problem a prompt belongs to (its text appears in the decoded prompt) and whether it is
a meta prompt (it contains "<meta>"), and returns the scripted texts for that (problem, kind) in
order, cycling. max_new_tokens is honoured (finish "length" when a text is cut), the tokenizer's
EOS is appended otherwise (finish "stop"). Every request is recorded for assertions.
"""
from __future__ import annotations

from masa_megatron.rollout.base import (Completion, GenerationResult, RolloutEngine)


class ScriptedEngine(RolloutEngine):
    def __init__(self, tokenizer, script: dict[tuple[str, str], list[str]]):
        self.tokenizer, self.script = tokenizer, script
        self.requests: list = []
        self.weight_updates = 0

    def _key(self, prompt_text: str) -> tuple[str, str]:
        kind = "meta" if "<meta>" in prompt_text else "solution"
        matches = [p for (p, k) in self.script if k == kind and p in prompt_text]
        if not matches:
            raise KeyError(f"no scripted {kind} completion for prompt {prompt_text[-80:]!r}")
        return max(matches, key=len), kind

    def generate(self, requests):
        results = []
        for req in requests:
            self.requests.append(req)
            text = self.tokenizer.decode(list(req.prompt_token_ids))
            texts = self.script[self._key(text)]
            completions = []
            for j in range(req.sampling.n):
                ids = self.tokenizer.encode(texts[j % len(texts)], add_special_tokens=False)
                cap = req.sampling.max_new_tokens
                if len(ids) + 1 > cap:
                    ids, reason = ids[:cap], "length"
                else:
                    ids, reason = ids + [self.tokenizer.eos_token_id], "stop"
                completions.append(Completion(ids, [-1.0] * len(ids), reason))
            results.append(GenerationResult(req.request_id, len(req.prompt_token_ids),
                                            completions))
        return results

    def update_weights(self, model=None, path=None, *, version=None):
        self.weight_updates += 1
        return self.weight_updates

    def pause(self):
        pass

    def resume(self):
        pass

    def health(self):
        return True

    def shutdown(self):
        pass
