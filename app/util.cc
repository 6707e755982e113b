// Small helpers shared by the CLI subcommands (declared in app/commands.h).
#include <cstdio>
#include <sstream>

#include "commands.h"

namespace fc::app {

int fail(const Status& st) {
  std::fprintf(stderr, "foldcube: error: %s\n", st.message().c_str());
  return 1;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

}  // namespace fc::app
