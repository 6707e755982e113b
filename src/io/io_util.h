// Helpers shared by the tensor-file readers (safetensors, npz).
#pragma once

#include <cstdio>
#include <functional>
#include <string>

#include "foldcube/io.h"
#include "foldcube/status.h"

namespace fc::io {

// A name from an untrusted file, quoted, cut after 100 characters and with control characters
// escaped, so that every message stays on one line.
std::string printable(const std::string& s);

// OK for an existing regular file; NotFound, IOError, or InvalidArgument for a directory, FIFO or
// device (which a reader must refuse rather than block on). Messages start with "<path>: ".
Status check_regular_file(const std::string& path);

// Writes `path` all or nothing: `write` fills a new temporary file in the same directory (unique
// per process and call), which is flushed, synced and renamed over `path` only when `write` and
// every step succeeded; on failure the temporary is removed and `path` is untouched. A device or
// FIFO (/dev/null, a pipe) is written in place. Messages start with "<path>: ".
Status write_file_atomic(const std::string& path, const std::function<Status(std::FILE*)>& write);

// "<stack>blocks.<i>.<rest>" (stack empty or ending in '.'): true with the stack and i.
bool parse_block_name(const std::string& name, std::string* stack, int64_t* block);

// read_safetensors materialising only the tensors `keep` accepts (BlockFilter, foldcube/io.h);
// the others are validated like every tensor, then skipped. shapes (optional): every tensor's
// name and shape, skipped ones included, and the metadata.
Status read_safetensors_filtered(const std::string& path, const BlockFilter& keep, TensorFile* out,
                                 TensorShapes* shapes = nullptr);
// read_npz passing each member to `fn` as it is read (archive order) instead of keeping them all.
Status read_npz_each(const std::string& path,
                     const std::function<Status(const std::string& key, Tensor t)>& fn);
// True when the file starts like a zip archive.
bool starts_like_zip(const std::string& path);

}  // namespace fc::io
