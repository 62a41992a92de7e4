// Errors thrown by torch_asgd.
//
// One policy: the public API throws a subclass of torch_asgd::Error. Misuse and bad
// configuration (ConfigError) are kept apart from failures of the network or of a
// peer (CommError), from ranks that disagree about what they exchange
// (MismatchError), and from a model that turned non-finite (DivergedError). Every
// message says which rank saw the problem, what was wrong and what to check. Errors
// raised on a background thread are stored and rethrown, with their original type, by
// the next call on the training thread.
#pragma once

#include <stdexcept>
#include <string>

namespace torch_asgd {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Bad options, bad environment variables, misuse of the API.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// The network or a peer failed: unreachable store, timeout, closed connection.
class CommError : public Error {
 public:
  using Error::Error;
};

// Ranks disagree about what they exchange (parameter names, shapes, dtypes).
class MismatchError : public Error {
 public:
  using Error::Error;
};

// Training diverged: a rank's model is no longer finite (NaN or Inf), so its updates
// would be refused by every peer.
class DivergedError : public Error {
 public:
  using Error::Error;
};

}  // namespace torch_asgd
