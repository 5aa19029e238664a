"""Chat features on top of plain generation: tool calls and reasoning ("thinking") output.

Owns: the registry of tool-call and reasoning formats per model family and how a model's format
is detected from its chat template and vocabulary (`formats.py`), checking and normalising
OpenAI `tools` / `tool_choice` and tool messages, and the grammar that forces a call
(`tools.py`), and splitting a model's output into content, reasoning and tool calls, streamed or
whole, with the same result for any split of the text (`parse.py`). Does not own: rendering
(job/render.py calls in here), record shapes (output/records.py) or HTTP (server/app.py).
"""
