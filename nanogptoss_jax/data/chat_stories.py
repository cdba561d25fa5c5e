"""Harmony chat conversations built from TinyStories: a newcomer's fine-tuning data.

Each story becomes one conversation: a user asks for a story about something the story holds
(its hero's name, a thing it mentions most), the assistant plans in `thinking` (harmony's
`analysis` channel: whom and what the story is about, its length, its lesson) and tells the
story as its answer (`final`). Training conversations come from the training stories and the
held-out ones from the validation stories, so no held-out story was ever trained on, in
pre-training or fine-tuning. Everything is decided by the seed.
"""

import collections
import json
import os
import re

import numpy as np

from nanogptoss_jax.data.config import DataConfig
from nanogptoss_jax.data.sources import load_split_texts

SPLITS = {"train": "train", "validation": "validation"}  # our split -> TinyStories' split
# Words that follow "a"/"the" without naming a thing a story is about.
NOT_THINGS = frozenset(
    "little big small old new very same other next best first last whole good happy sad nice "
    "pretty kind most end day time way top lot bit rest while kids children sun sky ground "
    "morning night park house".split())
NAME_PATTERN = re.compile(r"\b(?:named|called) ([A-Z][a-z]+)")
THING_PATTERN = re.compile(r"\b(?:a|an|the|his|her|their) ([a-z]{3,})\b")
LESSON_PATTERN = re.compile(r"\blearned (?:that |to )?([^.!?\n]{8,120})[.!]")
ASKS = ("Tell me a story about {topic}.", "Can you tell me a short story about {topic}?",
        "Please write a bedtime story about {topic}.", "I want a story with {topic} in it.",
        "Write a simple story for a child about {topic}.")
SYSTEMS = ("You are a friendly storyteller for young children.",
           "Tell simple stories that a three-year-old can follow.")
SYSTEM_ODDS = 3  # one conversation in SYSTEM_ODDS has a system message


def story_features(story: str) -> dict:
  """The hero's name and the most mentioned thing (None when not found), paragraphs, lesson."""
  names = NAME_PATTERN.findall(story)
  things = [w for w in THING_PATTERN.findall(story) if w not in NOT_THINGS]
  counts = collections.Counter(things)
  # Most mentioned, ties to the first mentioned: Counter keeps insertion order.
  thing = max(counts, key=counts.get) if counts else None
  lesson = LESSON_PATTERN.search(story)
  return {"hero": names[0] if names else None, "thing": thing,
          "paragraphs": len([p for p in story.split("\n") if p.strip()]),
          "lesson": lesson.group(1).strip() if lesson else None}


def _with_article(word: str) -> str:
  if word.endswith("s") and not word.endswith(("ss", "us")):
    return "some " + word  # a plural, most likely: "some leaves", not "a leaves"
  return ("an " if word[0] in "aeiou" else "a ") + word


def story_conversation(story: str, rng: np.random.Generator) -> dict | None:
  """One conversation {"messages": [...]} for a story; None when it names nothing to ask for."""
  features = story_features(story)
  hero, thing = features["hero"], features["thing"]
  topics = ([f"someone named {hero}"] if hero else []) + (
      [_with_article(thing)] if thing else []) + (
      [f"{hero} and {_with_article(thing)}"] if hero and thing else [])
  if not topics:
    return None
  topic = topics[rng.integers(len(topics))]
  ask = ASKS[rng.integers(len(ASKS))].format(topic=topic)
  about = " and ".join(part for part in (hero, thing and _with_article(thing)) if part)
  count = features["paragraphs"]
  plan = [f"The user wants a story about {topic}.",
          f"I will tell a short, simple story about {about}, in {count} "
          f"paragraph{'s' if count > 1 else ''}, with easy words for a young child."]
  if features["lesson"]:
    plan.append(f"It will end with a lesson: {features['lesson']}.")
  messages = [{"role": "user", "content": ask},
              {"role": "assistant", "thinking": " ".join(plan), "content": story}]
  if rng.integers(SYSTEM_ODDS) == 0:
    messages.insert(0, {"role": "system", "content": SYSTEMS[rng.integers(len(SYSTEMS))]})
  return {"messages": messages}


def story_conversations(stories: list[str], seed: int, split: str) -> list[dict]:
  """Conversations for the stories that name something, each decided by (seed, split, index)."""
  split_key = list(SPLITS).index(split)
  conversations = []
  for index, story in enumerate(stories):
    conversation = story_conversation(story, np.random.default_rng([seed, split_key, index]))
    if conversation is not None:
      conversations.append(conversation)
  return conversations


def write_story_chats(tinystories: str, out_dir: str, *, seed: int = 0, max_train: int = 0,
                      max_validation: int = 0) -> dict:
  """Writes out_dir/train.jsonl and out_dir/validation.jsonl from a TinyStories copy (anything
  data.path reads: the .txt files, their directory, or a datasets directory); returns counts."""
  os.makedirs(out_dir, exist_ok=True)
  counts = {}
  for split, source_split in SPLITS.items():
    cap = max_train if split == "train" else max_validation
    stories = load_split_texts(DataConfig(path=tinystories, max_stories=cap), source_split)
    conversations = story_conversations(stories, seed, split)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
    os.replace(path + ".tmp", path)
    counts[split] = {"stories": len(stories), "conversations": len(conversations)}
  return counts
