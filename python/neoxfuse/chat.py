"""Chat messages as a prompt: a Jinja chat template (the tokenizer's own, or one given) renders a
conversation, a list of {role, content}, into the text the model continues, as transformers'
apply_chat_template does; the text is then tokenized without adding special tokens (the template
writes the ones it wants). Used by the server's /v1/chat/completions and `generate --chat`."""

from __future__ import annotations

import jinja2

from neoxfuse.errors import InvalidInputError


def chat_tokens(engine, messages: object, template: str | None = None, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of `messages` (a non-empty list of {role, content}; content text or a list of
    {"type": "text", "text"} parts, joined by newlines) rendered by `template` (None: the engine's
    tokenizer's), with the assistant's turn opened after them where add_generation_prompt.
    InvalidInputError for messages of another form, a template that refuses them, or an engine
    without a tokenizer or a template."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise InvalidInputError(f"{engine.description} has no tokenizer, which a chat needs to make text of its messages; "
                                "give prompts as token ids instead")
    template = template or getattr(tokenizer, "chat_template", None)
    if template is None:
        raise InvalidInputError("the model has no chat template (its tokenizer holds none): give one (--chat-template FILE)")
    if not isinstance(add_generation_prompt, bool):
        raise InvalidInputError(f"add_generation_prompt must be true or false, got {add_generation_prompt!r}")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(message, dict) and isinstance(message.get("role"), str) and _text(message.get("content")) is not None
            for message in messages):
        raise InvalidInputError(f"messages must be a non-empty list of {{role, content}}, content text or text parts; "
                                f"got {messages!r}"[:300])
    messages = [{**message, "content": _text(message["content"])} for message in messages]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except jinja2.TemplateError as err:
        raise InvalidInputError(f"the chat template refused the messages: {err}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _text(content: object) -> str | None:
    """A message's content as text: the text itself, or a list of text parts joined by newlines; None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                                         for part in content):
        return "\n".join(part["text"] for part in content)
    return None
