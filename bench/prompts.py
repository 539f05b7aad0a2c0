"""The benchmarks' prompt texts: one list for every benchmark, independent of the tests.

``PROMPTS`` are short plain-text prompts of mixed kinds (the texts tests/conftest.py also
uses, copied here so results stay comparable with earlier runs); ``EXTRACTIVE`` asks the
model to repeat or summarize a passage given in the prompt (n-gram drafts are accepted);
``CHAT_QUESTIONS`` are open questions (drafts are rare).
"""

from __future__ import annotations

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a dragon who",
    "List three colors:",
    "Explain why the sky is blue in one paragraph. Use simple words that a child would understand.",
    "import numpy as np\nimport torch\n\nclass Model(torch.nn.Module):\n    def __init__(self):",
    "Q: What is 12 times 7?\nA:",
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
)

PASSAGES = (
    "The lighthouse on Gull Point was built in 1871 from granite quarried on the island itself. For almost a "
    "century a keeper and his family lived in the small stone house beside the tower, climbing its ninety-two "
    "steps every evening to light the lamp and every morning to trim the wick and polish the lens. In 1962 the "
    "light was automated, and the last keeper, Thomas Ward, moved to the mainland. Today the house is a museum "
    "run by volunteers, and visitors can climb the tower on summer weekends to see the original Fresnel lens, "
    "which still turns on its bed of mercury.",
    "To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt and seven grams of "
    "dried yeast. Add three hundred and fifty millilitres of warm water and stir until a rough dough forms. "
    "Knead the dough on a floured table for ten minutes, until it is smooth and springs back when pressed. "
    "Place it in an oiled bowl, cover it with a cloth and leave it in a warm place for one hour, until it has "
    "doubled in size. Shape it into a loaf, put it in a tin and let it rise for another thirty minutes. Bake it "
    "at two hundred and twenty degrees for thirty minutes, until it sounds hollow when tapped underneath.",
    "def moving_average(values, window):\n"
    "    if window <= 0:\n"
    "        raise ValueError('window must be positive')\n"
    "    averages = []\n"
    "    total = 0.0\n"
    "    for i, value in enumerate(values):\n"
    "        total += value\n"
    "        if i >= window:\n"
    "            total -= values[i - window]\n"
    "        if i >= window - 1:\n"
    "            averages.append(total / window)\n"
    "    return averages\n",
    "Hi team, a quick summary of today's planning meeting. We agreed to move the product launch from March 3 to "
    "March 17, because the payment integration needs two more weeks of testing. Priya will own the test plan "
    "and share it by Friday. Marcus will update the marketing calendar and tell the agency about the new date. "
    "The support team asked for a short guide to the new billing screens before launch; Elena offered to write "
    "it. Our next meeting is on Tuesday at ten, in the small conference room. Please send me any questions "
    "before then. Thanks, Sam",
)
TASKS = (
    "Repeat the following text exactly, word for word.",
    "Summarize the following text, reusing its wording where you can.",
)
CHAT_QUESTIONS = (
    "What are some good habits for staying healthy while working from home?",
    "Can you explain how a rainbow forms?",
    "Write a short story about a robot who learns to paint.",
    "What should I consider when buying my first bicycle?",
    "Why do cats purr?",
    "Give me some ideas for a birthday party for a ten-year-old.",
    "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?",
)
EXTRACTIVE = tuple(f"{task}\n\n{passage}" for passage in PASSAGES for task in TASKS)
