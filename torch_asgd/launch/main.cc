#include <cstdio>
#include <stdexcept>

#include "torch_asgd/launch/launcher.h"

int main(int argc, char** argv) {
  using namespace torch_asgd::launch;
  std::vector<std::string> args(argv + 1, argv + argc);
  LaunchOptions options;
  try {
    options = parse_args(args);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "asgd-launch: %s\n\n%s", e.what(), usage().c_str());
    return 2;
  }
  if (options.command.empty()) {  // --help
    std::fputs(usage().c_str(), stdout);
    return 0;
  }
  try {
    return run(options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asgd-launch: %s\n", e.what());
    return 1;
  }
}
