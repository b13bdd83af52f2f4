"""Prompt formatting. The response gets the tokenizer's EOS appended, as the paper's code does."""

from __future__ import annotations

from rayapp.config import TemplateConfig


class PromptFormatter:
    def __init__(self, template: TemplateConfig):
        self.with_input, self.no_input = template.prompts()

    def prompt(self, instruction: str, input_text: str) -> str:
        if input_text.strip():
            return self.with_input.format(instruction=instruction, input=input_text)
        return self.no_input.format(instruction=instruction)

    @staticmethod
    def response(output: str, eos_token: str | None) -> str:
        return output + (eos_token or "")
