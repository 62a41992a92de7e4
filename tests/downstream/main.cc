#include <cstdio>

#include <torch_asgd/torch_asgd.h>

int main() {
  // A world of one from an empty environment, and a header round trip.
  auto options = torch_asgd::WorldOptions::from_env({});
  torch_asgd::MessageHeader h;
  h.sender = 0;
  h.payload_bytes = 4;
  h.dtype = c10::ScalarType::Float;
  uint8_t bytes[torch_asgd::kHeaderBytes];
  torch_asgd::encode_header(h, bytes);
  torch_asgd::DecodeLimits limits;
  limits.world_size = 2;
  limits.receiver = 1;
  limits.max_payload_bytes = 4;
  torch_asgd::MessageHeader out;
  bool ok = options.world_size == 1 &&
            torch_asgd::decode_header(bytes, sizeof(bytes), limits, &out) == torch_asgd::Reject::kNone;
  std::printf("downstream %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
