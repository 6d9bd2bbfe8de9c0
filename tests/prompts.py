"""Prompts shared by the reference and batching tests: chat-templated and raw, 5 to ~200 tokens."""

from __future__ import annotations

from typing import Any

LONG_TEXT = (
    "The history of the bicycle spans more than two centuries. Early designs, such as the draisine "
    "of 1817, had no pedals: riders pushed themselves along with their feet. Pedals attached to the "
    "front wheel appeared in the 1860s in France, giving rise to the velocipede, nicknamed the "
    "boneshaker because of its iron tyres and wooden frame. The high-wheeler, or penny-farthing, "
    "followed in the 1870s; its huge front wheel gave a higher top speed but made falls dangerous. "
    "The safety bicycle of the 1880s, with two wheels of equal size and a chain driving the rear "
    "wheel, solved that problem, and together with the pneumatic tyre it made cycling popular "
    "across Europe and North America."
)

MEDIUM_TEXT = (
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into "
    "chemical energy. Inside the chloroplasts, chlorophyll absorbs mostly blue and red light. The "
    "energy splits water molecules, releasing oxygen, and is stored in ATP and NADPH, which the "
    "Calvin cycle then uses to fix carbon dioxide into sugars."
)

# (name, GenerateRequest fields).
REFERENCE_PROMPTS: list[tuple[str, dict[str, Any]]] = [
    ("chat_capital", {"messages": ({"role": "user", "content": "What is the capital of France?"},)}),
    ("chat_haiku", {"messages": ({"role": "user", "content": "Write a haiku about the ocean."},)}),
    ("chat_system", {"messages": (
        {"role": "system", "content": "You are a pirate. Always answer in pirate speak."},
        {"role": "user", "content": "How do I make a cup of tea?"},
    )}),
    ("chat_multi_turn", {"messages": (
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am a helpful assistant. How can I help you today?"},
        {"role": "user", "content": "Give me three tips for learning Python."},
    )}),
    ("chat_long_summary", {"messages": (
        {"role": "user", "content": LONG_TEXT + "\n\nSummarize the text above in one sentence."},
    )}),
    ("raw_fox", {"prompt": "The quick brown fox jumps"}),
    ("raw_code", {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"}),
    ("raw_counting", {"prompt": "1, 2, 3, 4, 5, 6,"}),
    ("raw_french", {"prompt": "La tour Eiffel est un monument situé à"}),
    ("raw_long_story", {"prompt": LONG_TEXT + " Today, the bicycle"}),
]

# Six more for the 16-request batching tests, with two more long (>= 60 token) prompts.
EXTRA_PROMPTS: list[tuple[str, dict[str, Any]]] = [
    ("raw_hi", {"prompt": "Hi"}),
    ("raw_planets", {"prompt": "Here is a list of the planets of the solar system, in order:\n"
                                "1. Mercury\n2."}),
    ("raw_photosynthesis", {"prompt": MEDIUM_TEXT + " In short,"}),
    ("chat_photosynthesis", {"messages": (
        {"role": "user", "content": MEDIUM_TEXT + "\n\nWhat gas do plants release?"},
    )}),
    ("chat_recipe", {"messages": ({"role": "user", "content": "Give me a simple recipe for pancakes."},)}),
    ("raw_json", {"prompt": '{"name": "Alice", "age": 30, "city": "Paris", "hobbies": ['}),
]

BATCH_PROMPTS = REFERENCE_PROMPTS + EXTRA_PROMPTS


def prompt_key(fields: dict[str, Any]) -> str:
    """A hashable key for a prompt's request fields."""
    return repr(sorted(fields.items()))
