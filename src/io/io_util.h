// Helpers shared by the tensor-file readers (safetensors, npz).
#pragma once

#include <string>

#include "foldcube/status.h"

namespace fc::io {

// A name from an untrusted file, quoted, cut after 100 characters and with control characters
// escaped, so that every message stays on one line.
std::string printable(const std::string& s);

// OK for an existing regular file; NotFound, IOError, or InvalidArgument for a directory, FIFO or
// device (which a reader must refuse rather than block on). Messages start with "<path>: ".
Status check_regular_file(const std::string& path);

}  // namespace fc::io
