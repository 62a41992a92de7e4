// A network whose every delivery the test decides: ranks are endpoints of one object in
// one thread, each message waits in its (sender, receiver) queue until the script moves
// it, and additive messages can be merged in their queue as a lagging sender's channel
// merges them. Optimizers run over it through the Transport interface, so that a test
// can produce any interleaving, delay, reordering across peers, or coalescing, and check
// the result against a reference computed another way.
#pragma once

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <torch/torch.h>

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/transport.h"

namespace torch_asgd {
namespace testing {

class ScriptedNetwork {
 public:
  // Additive stream 0 carries `numel` elements of `dtype`; `schema`: how the metadata of
  // its coalesced messages merges.
  ScriptedNetwork(int n, int64_t numel = 0, c10::ScalarType dtype = c10::kFloat,
                  MetaSchema schema = MetaSchema())
      : n_(n), numel_(numel), dtype_(dtype), schema_(std::move(schema)), queues_(n * n),
        inboxes_(n), killed_(n, false), closed_(n, false), fail_broadcast_(n, false),
        rejected_(n * n, 0), lost_(n * n, 0), sent_(n), waits_(n, 0) {}

  std::unique_ptr<Transport> endpoint(int rank) { return std::make_unique<Endpoint>(this, rank); }
  int size() const { return n_; }

  size_t in_flight(int from, int to) const { return queue(from, to).size(); }
  size_t in_flight() const {
    size_t k = 0;
    for (const auto& q : queues_) k += q.size();
    return k;
  }
  // Moves up to `count` of from's oldest messages to `to` into to's inbox.
  void deliver(int from, int to, size_t count = SIZE_MAX) {
    auto& q = queue(from, to);
    for (size_t i = 0; i < count && !q.empty(); ++i) {
      if (!killed_[to]) inboxes_[to].push_back(std::move(q.front()));
      q.pop_front();
    }
  }
  void deliver_all() {
    for (int a = 0; a < n_; ++a) {
      for (int b = 0; b < n_; ++b) deliver(a, b);
    }
  }
  // Merges the undelivered additive messages from -> to into the oldest of them.
  void coalesce(int from, int to) {
    auto& q = queue(from, to);
    std::deque<Message> out;
    for (auto& m : q) {
      if (m.delivery == Delivery::kAdditive && !out.empty() && out.back().delivery == Delivery::kAdditive) {
        out.back().payload = out.back().payload + m.payload;
        merge(out.back().meta, m.meta, schema_);
      } else {
        out.push_back(std::move(m));
      }
    }
    q = std::move(out);
  }
  // The rank dies: what it sent and what was sent to it vanish; peers see it failed.
  void kill(int rank) {
    killed_[rank] = true;
    for (int p = 0; p < n_; ++p) {
      lost_[p * n_ + rank] += queue(p, rank).size();  // sent to it, never acknowledged
      queue(rank, p).clear();
      queue(p, rank).clear();
    }
    inboxes_[rank].clear();
  }
  bool killed(int rank) const { return killed_[rank]; }
  // Rank `at` counts a frame from `from` as rejected (as a corrupt one would be).
  void mark_rejected(int at, int from) { rejected_[at * n_ + from] += 1; }
  // Applies `fn` to the payload of the oldest undelivered message from -> to, as a peer
  // sending something wrong that passed the channel's own checks would.
  void tamper(int from, int to, const std::function<void(at::Tensor&)>& fn) {
    fn(queue(from, to).front().payload);
  }
  // The next broadcast of `rank` throws CommError before it changes anything.
  void fail_next_broadcast(int rank) { fail_broadcast_[rank] = true; }
  // Additive payloads sent so far, by sender (what a test's reference adds up).
  const std::vector<at::Tensor>& additive_sent(int from) const { return sent_[from]; }
  // What happens while `rank` blocks in wait(): the script moves other ranks and
  // deliveries here, so that a wait ends by what the test did, not by a clock. Without
  // it a wait finds only what is delivered already, after sleeping its timeout when that
  // is nothing (nothing else can arrive meanwhile).
  std::function<void(int rank)> on_wait;
  int waits(int rank) const { return waits_[rank]; }

 private:
  class Endpoint : public Transport {
   public:
    Endpoint(ScriptedNetwork* net, int rank) : net_(net), rank_(rank) {}
    int rank() const override { return rank_; }
    int size() const override { return net_->n_; }
    void send(int peer, const Outgoing& msg) override {
      if (net_->killed_[rank_]) return;
      if (net_->killed_[peer]) {
        ++dropped_;
        return;
      }
      Message m;
      m.sender = rank_;
      m.delivery = msg.delivery;
      m.stream = msg.stream;
      m.payload = msg.payload.defined() ? msg.payload.contiguous().view({-1}).clone() : at::Tensor();
      m.meta = msg.meta;
      net_->queue(rank_, peer).push_back(std::move(m));
      ++sent_;
    }
    void broadcast_additive(uint8_t stream, const Metadata& meta,
                            const std::function<void(at::Tensor&, bool)>& fill) override {
      if (net_->fail_broadcast_[rank_]) {
        net_->fail_broadcast_[rank_] = false;
        throw CommError("scripted: this broadcast fails");
      }
      at::Tensor buffer = at::empty({net_->numel_}, at::TensorOptions().dtype(net_->dtype_));
      fill(buffer, false);
      net_->sent_[rank_].push_back(buffer);
      for (int p = 0; p < net_->n_; ++p) {
        if (p == rank_) continue;
        Outgoing o;
        o.delivery = Delivery::kAdditive;
        o.stream = stream;
        o.payload = buffer;
        o.meta = meta;
        send(p, o);
      }
    }
    Arrivals poll() override {
      Arrivals out;
      std::map<uint8_t, size_t> slot;
      for (auto& m : net_->inboxes_[rank_]) {
        ++received_;
        if (m.delivery != Delivery::kAdditive) {
          out.messages.push_back(std::move(m));
          continue;
        }
        auto it = slot.find(m.stream);
        if (it == slot.end()) {
          AdditiveArrival a;
          a.stream = m.stream;
          a.sum = m.payload.clone();
          slot[m.stream] = out.additive.size();
          out.additive.push_back(std::move(a));
          it = slot.find(m.stream);
        } else {
          out.additive[it->second].sum.add_(m.payload);
        }
        out.additive[it->second].parts.emplace_back(m.sender, std::move(m.meta));
      }
      net_->inboxes_[rank_].clear();
      return out;
    }
    Arrivals wait(std::chrono::milliseconds timeout) override {
      ++net_->waits_[rank_];
      if (net_->on_wait) {
        net_->on_wait(rank_);
      } else if (net_->inboxes_[rank_].empty()) {
        std::this_thread::sleep_for(timeout);
      }
      return poll();
    }
    bool close(std::chrono::milliseconds) override {
      net_->closed_[rank_] = true;
      return true;
    }
    std::vector<PeerCounters> counters() const override {
      std::vector<PeerCounters> out;
      for (int p = 0; p < net_->n_; ++p) {
        if (p == rank_) continue;
        PeerCounters c;
        c.peer = p;
        c.failed = net_->killed_[p];
        c.closed = net_->closed_[p];
        c.rejected = net_->rejected_[rank_ * net_->n_ + p];
        c.lost = net_->lost_[rank_ * net_->n_ + p];
        if (c.rejected > 0) c.last_reject = "scripted rejection";
        out.push_back(c);
      }
      if (!out.empty()) {
        out[0].sent_messages = sent_;
        out[0].received_messages = received_;
        out[0].dropped = dropped_;
      }
      return out;
    }
    std::vector<int> failed_peers() const override {
      std::vector<int> out;
      for (int p = 0; p < net_->n_; ++p) {
        if (p != rank_ && net_->killed_[p]) out.push_back(p);
      }
      return out;
    }
    std::vector<int> closed_peers() const override {
      std::vector<int> out;
      for (int p = 0; p < net_->n_; ++p) {
        if (p != rank_ && net_->closed_[p] && !net_->killed_[p]) out.push_back(p);
      }
      return out;
    }
    void rethrow_if_failed() override {}

   private:
    ScriptedNetwork* net_;
    int rank_;
    uint64_t sent_ = 0, received_ = 0, dropped_ = 0;
  };

  std::deque<Message>& queue(int from, int to) { return queues_[from * n_ + to]; }
  const std::deque<Message>& queue(int from, int to) const { return queues_[from * n_ + to]; }

  int n_;
  int64_t numel_;
  c10::ScalarType dtype_;
  MetaSchema schema_;
  std::vector<std::deque<Message>> queues_;
  std::vector<std::vector<Message>> inboxes_;
  std::vector<bool> killed_, closed_, fail_broadcast_;
  std::vector<uint64_t> rejected_, lost_;
  std::vector<std::vector<at::Tensor>> sent_;
  std::vector<int> waits_;  // wait() calls, by rank
};

}  // namespace testing
}  // namespace torch_asgd
