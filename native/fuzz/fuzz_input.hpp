// Shared by the fuzz harnesses: the engine reads GGUF files by path (a memory map), so each input is
// written to one anonymous in-memory file (memfd) and handed over as /proc/self/fd/N. No disk
// traffic, and no file left behind when a run is killed.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "gguf.hpp"

namespace edgeai::fuzz {

// The path of a file holding exactly data[0, size).
inline std::string as_file(const uint8_t *data, size_t size) {
    static const int fd = [] {
        const int f = ::memfd_create("edgeai-fuzz", 0);
        if (f < 0) std::perror("memfd_create"), std::abort();
        return f;
    }();
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) std::perror("memfd"), std::abort();
    return "/proc/self/fd/" + std::to_string(fd);
}

// An error message must be what FormatError promises: valid UTF-8 whatever the header bytes were.
inline void check_message(const char *what) {
    const std::string m(what);
    if (gguf::valid_utf8(m) != m) {
        std::fprintf(stderr, "error message is not valid UTF-8: %s\n", gguf::valid_utf8(m).c_str());
        std::abort();
    }
}

}  // namespace edgeai::fuzz
