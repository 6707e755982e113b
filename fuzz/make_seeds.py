#!/usr/bin/env python3
"""Regenerates the seed corpora under fuzz/corpus/ from the test data, the golden files and the
shipped profiles (small files only: headers and metadata are extracted, never 30 MB tensors).
Plan seeds are `foldcube plan --json` outputs and are kept as committed.
Usage: python3 fuzz/make_seeds.py [GOLDEN_DIR]   (default: ../shared/golden when present)"""
import json
import os
import shutil
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def st_file(header, data=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def small_file(md, entries):
    """A valid file: entries = [(name, dtype, shape)], zero data."""
    header, off = {}, 0
    if md is not None:
        header["__metadata__"] = md
    for name, dtype, shape in entries:
        n = 1
        for d in shape:
            n *= d
        nbytes = n * (4 if dtype == "F32" else 8)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    return st_file(header, bytes(off))


CONFIG_KEYS = ["c_m", "c_z", "c_hidden_msa_att", "no_heads_msa", "c_hidden_pair_att",
               "no_heads_pair", "c_hidden_opm", "c_hidden_mul", "transition_n", "no_blocks", "c_s"]


def main():
    golden = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared", "golden")
    sources = [os.path.join(ROOT, "tests", "data", f) for f in
               ("evo_tiny.safetensors", "extra_tiny.safetensors")]
    if os.path.isdir(golden):
        sources += [os.path.join(golden, f) for f in sorted(os.listdir(golden))
                    if f.endswith("_tiny.safetensors") or f == "feat_small.safetensors"]
    for target in ("safetensors", "config", "metadata", "profile", "fit_table"):
        shutil.rmtree(os.path.join(CORPUS, target), ignore_errors=True)

    # safetensors: small valid files, edge cases, and each golden file's metadata with its first
    # tensor entries re-laid on tiny shapes.
    put("safetensors", "empty", st_file({}))
    put("safetensors", "null_metadata", st_file({"__metadata__": None}))
    put("safetensors", "mixed", small_file({"k": "v"}, [("a", "F32", [2, 3]), ("b", "F64", [2]),
                                                        ("s", "F32", []), ("e", "F64", [0, 4])]))
    for src in sources:
        if not os.path.exists(src):
            continue
        base = os.path.basename(src).split(".")[0]
        h = read_header(src)
        md = h.get("__metadata__", {})
        keep = {k: v for k, v in md.items() if k in CONFIG_KEYS + ["config", "constants", "kind"]}
        names = [k for k in h if k != "__metadata__"][:6]
        put("safetensors", base + "_meta", small_file(keep, [(n, "F32", [2]) for n in names]))
        put("safetensors", base + "_shapes",
            small_file(None, [(n, h[n]["dtype"] if h[n]["dtype"] in ("F32", "F64") else "F32",
                               [min(d, 3) for d in h[n]["shape"]]) for n in names]))
        # config JSON and metadata seeds from the same files
        for key in ("config", "constants", "dims"):
            if key in md:
                put("config", base + "_" + key, md[key])
        put("metadata", base, b"\0".join(k.encode() + b"\0" + v.encode() for k, v in keep.items()))
    put("config", "defaults", json.dumps({"c_m": 256, "c_z": 128, "c_hidden_msa_att": 32,
                                          "no_heads_msa": 8, "eps_ln": 1e-5, "msa_dropout": 0.15}))
    put("config", "strings", '{"c_m": "32", "c_z": 16.0, "layer_norm_eps": "1e-5"}')
    put("metadata", "sizes_only", b"c_m\0" + b"8\0c_z\0" + b"4\0no_blocks\0" + b"1")

    for f in sorted(os.listdir(os.path.join(ROOT, "docs", "profiles"))):
        with open(os.path.join(ROOT, "docs", "profiles", f), "rb") as src:
            put("profile", f.rsplit(".", 1)[0], src.read())
    # measured-row tables (profile fit): the seeds' rows and cells at their limits
    for f in sorted(os.listdir(os.path.join(ROOT, "docs", "seeds"))):
        if f.endswith(".csv"):
            with open(os.path.join(ROOT, "docs", "seeds", f), "rb") as src:
                put("fit_table", f.rsplit(".", 1)[0], src.read())
    header = "s,r,blocks,train,policy,devices,dap,dtype,time_ms,peak_mb,activation_mb\n"
    put("fit_table", "limits", header + "1048576,1,1024,1,block,4096,4096,bf16,999999999999,0,0\r\n"
        "1,1048576,1,0,,1,,,,,\n# comment\n\n")


if __name__ == "__main__":
    main()
