// Additive messages under a lossy codec: encoded once, outside the lock, and what the
// encoding lost kept as the residual that rides along with the next message.
#include "torch_asgd/comm/detail/sender.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>

#include <ATen/Functions.h>
#include <fmt/format.h>
#include <gloo/context.h>
#include <gloo/transport/unbound_buffer.h>

#include "torch_asgd/comm/detail/receiver.h"
#include "torch_asgd/comm/detail/sender_state.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace detail {

void Sender::encode_ready(std::unique_lock<std::mutex>& lock) {
  // Messages about to be posted under a lossy codec are encoded here, outside the lock,
  // so that the training thread's broadcasts and the receiver's acknowledgements do not
  // wait for a pass over the model. Frozen first: nobody adds into them meanwhile.
  std::vector<std::pair<OutRef, const AdditiveStream*>> todo;
  for (int s = 0; s < kMaxStreams; ++s) {
    const AdditiveStream* spec = core_.streams[s];
    if (spec == nullptr || !spec->compression.lossy()) continue;
    for (auto& p : peers_) {
      if (!p || p->failed || p->bye_wanted) continue;
      const OutRef& w = p->additive[s];
      if (!w || w->frozen || w->residual_only || p->additive_in_flight[s] || held_for_group_locked(*p, s)) {
        continue;
      }
      w->frozen = true;
      todo.emplace_back(w, spec);
    }
  }
  if (todo.empty()) return;
  std::vector<Encoded> done;
  ++distributing_;
  lock.unlock();
  for (auto& [m, spec] : todo) done.push_back(encode_message(*m, *spec));  // m is frozen: read only
  lock.lock();
  --distributing_;
  for (size_t i = 0; i < todo.size(); ++i) {
    OutMsg& m = *todo[i].first;
    if (!done[i].wire.defined()) continue;
    m.checksummed = false;  // the checksum is of the bytes that travel
    m.wire = std::move(done[i].wire);
    m.codec = todo[i].second->compression.codec;
    m.residual = std::move(done[i].residual);
  }
}

Sender::Encoded Sender::encode_message(const OutMsg& m, const AdditiveStream& spec) {
  Encoded e;
  const int64_t numel = spec.numel;
  e.wire = at::empty({codec::encoded_bytes(spec.compression, numel)}, at::TensorOptions().dtype(at::kByte));
  e.residual = new_message(FrameType::kAdditive, spec.id, spec.dtype, numel);
  if (!codec::encode(spec.compression, m.payload.data_ptr<float>(), numel, e.wire.data_ptr<uint8_t>(),
                     e.residual->payload.data_ptr<float>())) {
    return Encoded();  // values the codec cannot take: it travels as it is
  }
  e.residual->residual_only = true;  // metadata: none (no update of its own)
  return e;
}

void Sender::drop_residual_if_unneeded_locked(OutMsg* m, int s) {
  // A message's residual is for the peers that post it; once no waiting slot holds the
  // message any more, nobody will, and the residual need not live as long as it does.
  if (m == nullptr || !m->residual) return;
  for (const auto& p : peers_) {
    if (p && p->additive[s].get() == m) return;
  }
  m->residual.reset();
}

}  // namespace detail
}  // namespace torch_asgd
