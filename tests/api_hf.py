"""A Hugging Face model handed to ``gpupar.train`` trains under --pp 2 and --tp 2 as on one
device, with the user's own ``loss(output, batch)`` reading ``output.logits`` (run under
torchrun with 2 ranks by tests/test_hf.py; prints "OK <layout>").

The model arrives as a Python object, not as ``hf:``: gpupar gives it what ``hf:`` gives, its
decoder layers as pipeline stages and its own tensor-parallel plan (models/hf.py adopt)."""

import torch
import torch.distributed as dist

import gpupar
from gpupar.config import Config


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=32))


def next_token_loss(output, batch):
    _, targets = batch
    return torch.nn.functional.cross_entropy(output.logits.flatten(0, 1), targets.flatten())


def train(**parallel):
    cfg = Config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 4, 16, 0.01
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    ids = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(1))
    result = gpupar.train(llama(), (ids[:, :-1], ids[:, 1:]), loss=next_token_loss, config=cfg)
    return result.history.step_losses, result.model


def main():
    from torch.distributed.tensor import DTensor, Shard

    reference, _ = train()  # this rank alone, on its one device
    for name, layout in (("pp", {"pp": 2}), ("tp", {"tp": 2})):
        losses, model = train(**layout)
        if name == "tp":  # Llama's own plan shards q_proj by columns (the traced plan leaves it whole)
            q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
            assert isinstance(q, DTensor) and q.placements == (Shard(0),), type(q)
        # Float32 sums in another order (stage and shard boundaries): a few ulps per step of
        # losses near 4.2, compounded over 8 Adam steps.
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
        if dist.get_rank() == 0:
            print(f"\nOK {name}", flush=True)


if __name__ == "__main__":
    main()
