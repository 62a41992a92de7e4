#include <cstdio>
#include <vector>

#include <torch/torch.h>
#include <torch_asgd/torch_asgd.h>

// The README's sharding snippet ("Sharding the data"), on an in-memory data set: with a
// world of one, each epoch visits every sample once.
int64_t samples_in_shards(const torch_asgd::World& world, int epochs) {
  auto data = torch::data::datasets::TensorDataset(torch::arange(100).unsqueeze(1))
                  .map(torch::data::transforms::Stack<torch::data::TensorExample>());
  const size_t n = data.size().value();
  int64_t seen = 0;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    torch::data::samplers::DistributedRandomSampler shard(n, world.size(), world.rank());
    shard.set_epoch(epoch);
    auto loader = torch::data::make_data_loader(data, std::move(shard),
                                                torch::data::DataLoaderOptions().batch_size(16));
    for (auto& batch : *loader) seen += batch.data.size(0);
  }
  return seen;
}

int main() {
  // A world of one from an empty environment, a frame header round trip, and an
  // optimizer around an inner Adam.
  auto options = torch_asgd::WorldOptions::from_env({});
  torch_asgd::FrameHeader h;
  h.sender = 0;
  h.payload_bytes = 4;
  h.dtype = c10::ScalarType::Float;
  h.meta_fields = 1;
  torch_asgd::Metadata meta({7});
  std::vector<uint8_t> bytes(h.frame_bytes());
  torch_asgd::encode_frame_header(h, meta, bytes.data());
  torch_asgd::DecodeLimits limits;
  limits.world_size = 2;
  limits.receiver = 1;
  limits.max_payload_bytes = 4;
  limits.max_meta_bytes = 64;
  limits.frame_capacity = 4096;
  torch_asgd::FrameHeader out;
  bool ok = options.world_size == 1 &&
            torch_asgd::decode_frame_header(bytes.data(), bytes.size(), limits, &out) ==
                torch_asgd::Reject::kNone;
  auto w = torch::zeros({3}, torch::requires_grad());
  torch_asgd::DASGD opt(std::make_shared<torch::optim::Adam>(std::vector<torch::Tensor>{w},
                                                            torch::optim::AdamOptions(0.1)));
  w.mutable_grad() = torch::ones({3});
  opt.step();
  ok = ok && w.lt(0).all().item<bool>();
  ok = ok && samples_in_shards(*torch_asgd::World::from_env(), 2) == 200;
  std::printf("downstream %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
