#include "torch_asgd/optim/dasgd.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/serialize.h>
#include <torch/torch.h>

#include "torch_asgd/comm/detail/log.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/device_pipeline.h"
#include "torch_asgd/optim/detail/flat_params.h"
#include "torch_asgd/optim/detail/sgd_rule.h"

namespace torch_asgd {

std::string to_string(DASGDMode mode) { return mode == DASGDMode::kDelta ? "delta" : "gossip"; }

DASGDOptions::DASGDOptions(double lr) : lr_(lr) {}

void DASGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dampening);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(broadcast_every);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(gossip_alpha);
  archive.write("mode", torch::IValue(static_cast<int64_t>(mode())));
}

void DASGDOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, dampening);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, broadcast_every);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, gossip_alpha);
  torch::IValue mode_value;
  if (archive.try_read("mode", mode_value)) mode(static_cast<DASGDMode>(mode_value.toInt()));
}

std::string DASGDStats::str() const {
  std::string mixing = models_mixed > 0 ? fmt::format(", {} models mixed", models_mixed)
                                        : fmt::format(", {} peer updates applied", remote_updates);
  std::string failed =
      failed_peers.empty() ? "" : fmt::format("; failed peers {}", fmt::join(failed_peers, ", "));
  return fmt::format(
      "rank {}/{}: {} local steps, model version {}{}; staleness {}; messages sent {}, "
      "received {}, coalesced {}, rejected {}{}",
      rank, world_size, local_steps, version, mixing, staleness.str(), messages_sent,
      messages_received, coalesced, rejected, failed);
}

namespace {

std::vector<std::string> names_of(const torch::OrderedDict<std::string, torch::Tensor>& named) {
  return named.keys();
}

}  // namespace

DASGD::DASGD(std::vector<torch::Tensor> params, DASGDOptions defaults, std::shared_ptr<World> world)
    : DASGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(
                std::move(params))},
            std::move(defaults), std::move(world)) {}

DASGD::DASGD(const torch::OrderedDict<std::string, torch::Tensor>& named, DASGDOptions defaults,
             std::shared_ptr<World> world)
    : DASGD(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(
                named.values())},
            std::move(defaults), std::move(world), names_of(named)) {}

DASGD::DASGD(std::vector<torch::optim::OptimizerParamGroup> groups, DASGDOptions defaults,
             std::shared_ptr<World> world, std::vector<std::string> names)
    : Optimizer(groups, std::make_unique<DASGDOptions>(defaults)),
      options_(std::move(defaults)),
      world_(std::move(world)),
      names_(std::move(names)) {
  detail::reapply_group_options(groups, param_groups_);
  init();
}

void DASGD::init() {
  detail::check_groups<DASGDOptions>(param_groups_, "DASGD");
  TORCH_CHECK(options_.broadcast_every() >= 1, "Invalid broadcast_every: ",
              options_.broadcast_every(), " (must be >= 1)");
  TORCH_CHECK(options_.gossip_alpha() > 0 && options_.gossip_alpha() <= 1,
              "Invalid gossip_alpha: ", options_.gossip_alpha(), " (must be in (0, 1])");
  flat_ = std::make_unique<detail::FlatParams>(param_groups_, names_);
  if (world_ && world_->size() > 1) {
    ChannelOptions co;
    co.name = "dasgd";
    co.capacity_bytes = flat_->bytes();
    co.on_peer_failure = options_.on_peer_failure();
    Fingerprint fp = flat_->fingerprint();
    fp.set("algorithm", "dasgd").set("mode", to_string(options_.mode()));
    channel_ = world_->open_channel(co, fp);
    if (options_.mode() == DASGDMode::kDelta && options_.overlap() && !flat_->on_cpu()) {
      pipeline_ = std::make_unique<detail::DevicePipeline>(flat_->device(), flat_->numel(),
                                                           flat_->dtype());
      delta_ = pipeline_->current();
    } else if (options_.mode() == DASGDMode::kDelta) {
      delta_ = torch::zeros({flat_->numel()},
                            torch::TensorOptions().dtype(flat_->dtype()).device(flat_->device()));
    }
  }
}

DASGD::~DASGD() {
  try {
    finish(std::chrono::seconds(10));
  } catch (const std::exception& e) {
    detail::log_warning(std::string("DASGD: finish() in the destructor failed: ") + e.what());
  }
}

torch::Tensor DASGD::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss = {};
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  if (finished_) throw ConfigError("DASGD: step() after finish()");
  size_t nparams = 0;
  for (const auto& g : param_groups_) nparams += g.params().size();
  if (nparams != flat_->params().size()) {
    throw ConfigError("DASGD: parameters were added after construction; every rank must pass "
                      "all parameter groups to the constructor");
  }

  const bool exchange = channel_ != nullptr;
  const bool delta_mode = options_.mode() == DASGDMode::kDelta;
  const int64_t computed_at = version_;
  const bool stepped = detail::for_each_sgd_update<DASGDOptions>(
      param_groups_, state_, [&](size_t i, torch::Tensor& p, const torch::Tensor& d_p, double lr) {
        if (exchange && delta_mode) {
          // What is added here is exactly what the peers will add.
          auto d = d_p.mul(-1 * lr);
          p.data().add_(d);
          flat_->view(delta_, i).add_(d);
        } else {
          p.data().add_(d_p, -1 * lr);
        }
      });
  if (stepped) {
    ++local_steps_;
    staleness_.add(version_, computed_at);  // a local update is never stale
    ++version_;
    pending_.add(computed_at);
  }
  if (exchange) {
    if (stepped && local_steps_ % options_.broadcast_every() == 0) {
      if (delta_mode) {
        send_delta();
      } else {
        gossip_request();
      }
    }
    if (!hold_arrivals_) apply(channel_->poll());
  }
  return loss;
}

void DASGD::send_delta() {
  if (pending_.count == 0) return;
  Outgoing msg;
  msg.kind = MessageKind::kDelta;
  msg.delivery = Delivery::kAdditive;
  msg.sender_step = local_steps_;
  msg.model_version = version_;
  msg.updates = pending_;
  pending_ = UpdateStats();
  if (pipeline_) {
    // Copied to the host on the side stream, handed over from the pipeline's thread.
    pipeline_->ship([this, msg](const at::Tensor& host) mutable {
      msg.payload = host;
      channel_->broadcast(msg);
    });
    delta_ = pipeline_->current();
    return;
  }
  msg.payload = delta_.to(torch::kCPU);  // one copy to the host (none on CPU)
  channel_->broadcast(msg);
  delta_.zero_();
}

void DASGD::gossip_request() {
  const int n = world_->size();
  const int rounds = std::max(1, static_cast<int>(std::ceil(std::log2(n))));
  const int peer = (world_->rank() + (1 << (gossip_round_ % rounds))) % n;
  at::Tensor snapshot = flat_->flatten();
  Outgoing msg;
  msg.kind = MessageKind::kModel;
  msg.delivery = Delivery::kReplace;
  msg.payload = snapshot;
  msg.sender_step = gossip_round_;
  msg.model_version = version_;
  channel_->send(peer, msg);
  snapshots_[gossip_round_] = std::move(snapshot);
  // A request replaced before it left, or whose peer failed, is never answered.
  while (!snapshots_.empty() && snapshots_.begin()->first < gossip_round_ - rounds - 2) {
    snapshots_.erase(snapshots_.begin());
  }
  ++gossip_round_;
}

void DASGD::apply(std::vector<Message> messages) {
  for (const auto& m : messages) apply_one(m);
}

void DASGD::apply_one(const Message& m) {
  torch::NoGradGuard no_grad;
  const MessageHeader& h = m.header;
  if (h.kind == MessageKind::kDelta) {
    flat_->add_(pipeline_ ? pipeline_->to_device(m.payload) : m.payload);
    staleness_.add(version_, h.updates);
    version_ += h.updates.count;
    remote_updates_ += h.updates.count;
    return;
  }
  if (h.kind != MessageKind::kModel && h.kind != MessageKind::kReply) return;
  // Gossip: x <- x + alpha (x_peer - x_snap), x_snap being this rank's model when the
  // exchange began: now for a peer's request, the saved snapshot for a reply.
  at::Tensor current = flat_->flatten();
  at::Tensor snap = current;
  if (h.kind == MessageKind::kModel) {
    if (!finished_) {
      Outgoing reply;
      reply.kind = MessageKind::kReply;
      reply.delivery = Delivery::kReplace;
      reply.payload = current;
      reply.sender_step = h.sender_step;
      reply.model_version = version_;
      channel_->send(h.sender, reply);
    }
  } else {
    auto it = snapshots_.find(h.sender_step);
    if (it != snapshots_.end()) {
      snap = it->second;
      snapshots_.erase(it);
    }
  }
  flat_->add_((m.payload - snap).mul_(options_.gossip_alpha()));
  staleness_.add(version_, std::min(version_, h.model_version));
  version_ = std::max(version_, h.model_version);
  ++models_mixed_;
}

bool DASGD::finish(std::chrono::milliseconds timeout) {
  if (finished_) return true;
  if (!channel_) {
    finished_ = true;
    return true;
  }
  if (options_.mode() == DASGDMode::kDelta) send_delta();
  if (pipeline_) pipeline_->drain();  // every delta handed to the channel before goodbye
  // Requests that still arrive are mixed but not answered: our goodbye is sent.
  finished_ = true;
  bool clean = channel_->close(timeout);
  apply(channel_->poll());
  return clean;
}

DASGDStats DASGD::stats() const {
  DASGDStats s;
  s.rank = world_ ? world_->rank() : 0;
  s.world_size = world_ ? world_->size() : 1;
  s.local_steps = local_steps_;
  s.version = version_;
  s.remote_updates = remote_updates_;
  s.models_mixed = models_mixed_;
  s.staleness = staleness_;
  if (channel_) {
    for (const auto& c : channel_->counters()) {
      s.messages_sent += c.sent_messages;
      s.messages_received += c.received_messages;
      s.coalesced += c.coalesced + c.coalesced_received;
      s.rejected += c.rejected;
      s.dropped += c.dropped;
      if (c.failed) s.failed_peers.push_back(c.peer);
    }
  }
  return s;
}

void DASGD::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<DASGDParamState, DASGDOptions>(archive, *this);
  detail::write_fingerprint(archive, "torch_asgd/dasgd", flat_->fingerprint());
  detail::write_int64s(archive, "torch_asgd/dasgd/counters",
                       {local_steps_, version_, remote_updates_, models_mixed_, gossip_round_,
                        pending_.count, pending_.version_sum, pending_.version_min,
                        staleness_.count, staleness_.sum, staleness_.max});
  detail::write_group_lrs(archive, "torch_asgd/dasgd", param_groups_);
  if (delta_.defined()) archive.write("torch_asgd/dasgd/delta", delta_);
}

void DASGD::load(torch::serialize::InputArchive& archive) {
  detail::check_fingerprint(archive, "torch_asgd/dasgd", flat_->fingerprint(), "DASGD");
  torch::optim::serialize<DASGDParamState, DASGDOptions>(archive, *this);
  auto c = detail::read_int64s(archive, "torch_asgd/dasgd/counters", 11);
  local_steps_ = c[0];
  version_ = c[1];
  remote_updates_ = c[2];
  models_mixed_ = c[3];
  gossip_round_ = c[4];
  pending_.count = c[5];
  pending_.version_sum = c[6];
  pending_.version_min = c[7];
  staleness_.count = c[8];
  staleness_.sum = c[9];
  staleness_.max = c[10];
  detail::read_group_lrs(archive, "torch_asgd/dasgd", param_groups_);
  if (delta_.defined()) {
    torch::Tensor saved;
    if (archive.try_read("torch_asgd/dasgd/delta", saved)) delta_.copy_(saved);
  }
}

}  // namespace torch_asgd
