#!/usr/bin/env python3
"""Boltz checkpoint -> foldcube safetensors for the AF3 trunk stacks.

Writes the Pairformer stack (`pairformer_module.*`) or the MSA module (`msa_module.*`) of a Boltz-2
checkpoint (a Lightning .ckpt whose "state_dict" holds the model) as a safetensors file under the
names foldcube reads (`foldcube run --stack pairformer|msa_module --weights OUT`): the module's own
state_dict names (layers.<i>.*, s_proj.weight, msa_proj.weight), F32, with metadata kind.

Needs torch (only to unpickle the checkpoint). Usage:
  scripts/boltz_to_safetensors.py boltz2_conf.ckpt --stack pairformer --out pairformer.safetensors
"""
import argparse
import json
import struct
import sys

PREFIXES = {"pairformer": "pairformer_module.", "msa_module": "msa_module."}


def module_state(state, prefix):
    out = {}
    for name, t in state.items():
        if name.startswith(prefix):
            out[name[len(prefix):]] = t
    return out


def f32_bytes(t):
    """The tensor's elements as little-endian float32 bytes (numpy when present, else plain)."""
    t = t.detach().to("cpu").float().contiguous()
    try:
        return t.numpy().astype("<f4").tobytes()
    except (ImportError, RuntimeError):
        values = t.flatten().tolist()
        return struct.pack(f"<{len(values)}f", *values)


def write_safetensors(path, tensors, metadata):
    """Minimal writer: F32, C order, little endian, tensors back to back in insertion order."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, t in tensors.items():
        data = f32_bytes(t)
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--stack", choices=sorted(PREFIXES), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("boltz_to_safetensors: torch is needed to read a Boltz checkpoint")
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    tensors = module_state(state, PREFIXES[args.stack])
    if not tensors:
        sys.exit(f"boltz_to_safetensors: no '{PREFIXES[args.stack]}*' tensors in {args.checkpoint}")
    # Boltz keeps EMA copies and buffers beside the parameters in some checkpoints; only float
    # tensors of the module's state dict are written.
    tensors = {k: v for k, v in tensors.items() if v.is_floating_point()}
    write_safetensors(args.out, tensors, {"format": "boltz-state-dict/1", "kind": args.stack,
                                          "source": args.checkpoint})
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
