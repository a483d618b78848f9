"""Few-shot text classification with a Hugging Face model and LoRA, meta-trained with MAML: the
LoRA adapters (and the classification head) adapt in the inner loop, batched over the tasks; the
base model stays frozen. No hub access: a tiny BERT is built from a config, and the tasks are
synthetic -- each class of a task is a few "topic" words, sentences are random filler with topic
words mixed in, and the labels are permuted per task, so only adaptation tells the classes apart.

    pip install meta_kernels[hf]          # transformers, peft
    python python/hf_lora_maml.py --steps 150
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

import meta_kernels as mk

VOCAB, LENGTH, TOPIC_WORDS = 200, 16, 2


def synthetic_tasks(tasks: int, n_way: int, k_shot: int, q_query: int, g: torch.Generator):
    """(support inputs, support labels, query inputs, query labels), inputs as the model's keyword
    arguments {input_ids, attention_mask} [T, N, LENGTH], labels [T, N] in 0..n_way-1."""
    def draw(topics: torch.Tensor, n: int):
        ids = torch.randint(n_way * TOPIC_WORDS + 1, VOCAB, (tasks, n_way * n, LENGTH), generator=g)
        words = topics.repeat_interleave(n, dim=1)  # [T, n_way * n, TOPIC_WORDS]
        where = torch.randint(0, LENGTH, (tasks, n_way * n, 8), generator=g)
        pick = torch.randint(0, TOPIC_WORDS, (tasks, n_way * n, 8), generator=g)
        ids.scatter_(2, where, words.gather(2, pick))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # Each task draws its classes' topic words; label i names the task's i-th class.
    topics = torch.stack([torch.randperm(n_way * TOPIC_WORDS, generator=g)[: n_way * TOPIC_WORDS] + 1
                          for _ in range(tasks)]).reshape(tasks, n_way, TOPIC_WORDS)
    labels = lambda n: torch.arange(n_way).repeat_interleave(n).repeat(tasks, 1)
    return draw(topics, k_shot), labels(k_shot), draw(topics, q_query), labels(q_query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch")
    parser.add_argument("--n-way", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=args.n_way)
    model = get_peft_model(BertForSequenceClassification(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                                      modules_to_save=["classifier"]))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"tiny BERT: {frozen} frozen base weights, {adapted} LoRA and head weights adapted and meta-trained")
    learner = mk.MetaLearner(model, mk.MAMLConfig(algo="maml", inner_steps=3, inner_lr=1.0, inner_clip=None,
                                                  meta_lr=1e-2))
    print(mk.explain(model, config=learner.config).splitlines()[0])
    for step in range(args.steps):
        metrics = learner.step(synthetic_tasks(args.tasks, args.n_way, 2, 4, g), track_curve=True)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: query accuracy before adaptation {metrics['pre_adapt_acc']:.3f}, "
                  f"after {metrics['post_adapt_acc']:.3f} (chance {1 / args.n_way:.3f})", flush=True)
    base = [p for p in model.parameters() if not p.requires_grad]
    print(f"base weights still frozen: {all(p.grad is None for p in base)}")


if __name__ == "__main__":
    main()
