#include "torch_asgd/optim/distributed_optimizer.h"

#include <algorithm>
#include <limits>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <c10/util/Type.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/lbfgs.h>
#include <torch/optim/rmsprop.h>
#include <torch/torch.h>

#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/detail/bytes.h"
#include "torch_asgd/detail/log.h"
#include "torch_asgd/optim/detail/checkpoint.h"
#include "torch_asgd/optim/detail/flat_params.h"

namespace torch_asgd {
namespace {

// The options of an AsGrad worker's groups: it has no learning rate of its own.
struct NoRuleOptions : public torch::optim::OptimizerCloneableOptions<NoRuleOptions> {
  double get_lr() const override { return 0; }
  void set_lr(const double) override {
    throw ConfigError("an AsGrad worker has no learning rate: the server's rule steps its "
                      "parameters; attach the LR scheduler to the ParameterServer");
  }
};

// Copies `from` into `to` in place when both are one of LibTorch's option types (so that
// a reference to `to`, its type's own, stays valid); else only the learning rate.
template <typename T>
bool assign_as(const torch::optim::OptimizerOptions& from, torch::optim::OptimizerOptions& to) {
  const auto* f = dynamic_cast<const T*>(&from);
  auto* t = dynamic_cast<T*>(&to);
  if (f == nullptr || t == nullptr) return false;
  *t = *f;
  return true;
}
void assign_options(const torch::optim::OptimizerOptions& from, torch::optim::OptimizerOptions& to) {
  if (&from == &to) return;
  if (assign_as<torch::optim::SGDOptions>(from, to) || assign_as<torch::optim::AdamOptions>(from, to) ||
      assign_as<torch::optim::AdamWOptions>(from, to) ||
      assign_as<torch::optim::RMSpropOptions>(from, to) ||
      assign_as<torch::optim::AdagradOptions>(from, to)) {
    return;
  }
  to.set_lr(from.get_lr());
}

// The wrapper's groups: the inner groups' parameters, with options of the inner's own
// type (so that static_cast<torch::optim::SGDOptions&>(group.options()) is valid).
torch::optim::Optimizer& checked(torch::optim::Optimizer* inner) {
  if (inner == nullptr) throw ConfigError("the inner optimizer is null: give the optimizer a local rule");
  return *inner;
}

std::vector<torch::optim::OptimizerParamGroup> groups_of(torch::optim::Optimizer* inner) {
  checked(inner);
  std::vector<torch::optim::OptimizerParamGroup> out;
  for (const auto& g : inner->param_groups()) {
    out.emplace_back(g.params(), g.options().clone());
  }
  return out;
}

std::string type_name(const torch::optim::Optimizer& o) { return c10::demangle(typeid(o).name()); }


}  // namespace

Params::Params(std::vector<torch::Tensor> params) {
  groups_.emplace_back(std::move(params));
}

Params::Params(const torch::OrderedDict<std::string, torch::Tensor>& named)
    : names_(named.keys()) {
  groups_.emplace_back(named.values());
}

Params::Params(std::vector<torch::optim::OptimizerParamGroup> groups) : groups_(std::move(groups)) {}

std::vector<torch::Tensor> Params::take_tensors() {
  std::vector<torch::Tensor> out;
  for (auto& g : groups_) {
    for (auto& p : g.params()) out.push_back(p);
  }
  groups_.clear();
  return out;
}

Model Params::names_or(Model model) const {
  if (!model.names().empty() || !model.named_parameters().is_empty() || names_.empty()) return model;
  Model named(names_);
  return named.start(model.start());
}

Model::Model(const torch::nn::Module& module)
    : parameters_(module.named_parameters(/*recurse=*/true)), buffers_(module.named_buffers(/*recurse=*/true)) {
  names_ = parameters_.keys();
}

DistributedOptimizer::DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> inner,
                                           std::string algorithm, Model model)
    : Optimizer(groups_of(inner.get()), checked(inner.get()).defaults().clone()),
      inner_(std::move(inner)),
      algorithm_(std::move(algorithm)),
      rule_name_(type_name(*inner_)) {
  if (dynamic_cast<torch::optim::LBFGS*>(inner_.get()) != nullptr) {
    throw ConfigError(fmt::format(
        "{}: torch::optim::LBFGS cannot be the local rule: it evaluates a closure several times "
        "per step, and an asynchronous optimizer applies each rank's step once. Use SGD, Adam, "
        "AdamW, RMSprop or Adagrad",
        algorithm_));
  }
  if (inner_->param_groups().empty()) {
    throw ConfigError(algorithm_ + ": the inner optimizer has no parameters");
  }
  init_model(model);
  for (const auto& g : inner_->param_groups()) pushed_lrs_.push_back(g.options().get_lr());
}

DistributedOptimizer::DistributedOptimizer(std::vector<torch::Tensor> params, std::string algorithm,
                                           Model model)
    : Optimizer({torch::optim::OptimizerParamGroup(std::move(params), std::make_unique<NoRuleOptions>())},
                std::make_unique<NoRuleOptions>()),
      algorithm_(std::move(algorithm)),
      rule_name_("none") {
  init_model(model);
}

void DistributedOptimizer::init_model(const Model& model) {
  std::vector<std::string> names = model.names();
  if (!model.named_parameters().is_empty()) {
    // A module: each parameter named by identity (the inner optimizer may hold a subset,
    // or another order).
    std::unordered_map<const void*, std::string> by_impl;
    for (const auto& item : model.named_parameters()) by_impl[item.value().unsafeGetTensorImpl()] = item.key();
    names.clear();
    for (const auto& g : param_groups_) {
      for (const auto& p : g.params()) {
        auto it = by_impl.find(p.unsafeGetTensorImpl());
        names.push_back(it != by_impl.end() ? it->second : fmt::format("param[{}]", names.size()));
      }
    }
  }
  flat_ = std::make_unique<detail::FlatParams>(param_groups_, std::move(names));
  start_ = model.start();
  for (const auto& item : model.buffers()) {
    if (!item.value().defined()) continue;
    buffers_.push_back(item.value());
    buffer_names_.push_back(item.key());
  }
}

DistributedOptimizer::~DistributedOptimizer() = default;

torch::optim::Optimizer& DistributedOptimizer::inner() {
  if (!inner_) throw ConfigError(algorithm_ + " has no local rule: its parameters are stepped elsewhere");
  return *inner_;
}
const torch::optim::Optimizer& DistributedOptimizer::inner() const {
  return const_cast<DistributedOptimizer*>(this)->inner();
}

std::shared_ptr<World> DistributedOptimizer::world_or_default(std::shared_ptr<World> world) {
  if (world) return world;
  return World::process_default();
}

void DistributedOptimizer::add_param_group(const torch::optim::OptimizerParamGroup&) {
  throw ConfigError(fmt::format(
      "{}: parameter groups cannot be added after construction (every rank would have to add the "
      "same group at the same point); give the inner optimizer all its groups before wrapping it",
      algorithm_));
}

void DistributedOptimizer::throw_if_finished() const {
  if (finished_) {
    throw ConfigError(fmt::format("{}: step() after finish(): this rank's training has ended",
                                  algorithm_));
  }
}

void DistributedOptimizer::finish_in_destructor(int rank) noexcept {
  if (finished_) return;
  try {
    detail::log_warning(fmt::format(
        "rank {}: {} destroyed without finish(): finishing now (bounded by 10 s) so that the "
        "peers get this rank's last updates; call finish() yourself to choose the bound and see "
        "whether every peer finished",
        rank, algorithm_));
    finish(std::chrono::seconds(10));
  } catch (const std::exception& e) {
    detail::log_warning(fmt::format("{}: finish() in the destructor failed: {}", algorithm_, e.what()));
  } catch (...) {
    detail::log_warning(algorithm_ + ": finish() in the destructor failed");
  }
}

bool DistributedOptimizer::refresh_views() {
  // Groups added to the inner optimizer, or to this one through the base class, show as
  // parameters the flat buffer does not hold.
  size_t count = 0;
  if (inner_) {
    for (const auto& g : inner_->param_groups()) count += g.params().size();
  }
  size_t mine = 0;
  for (const auto& g : param_groups_) mine += g.params().size();
  return flat_->ensure_views(std::max(count, mine));
}

void DistributedOptimizer::sync_group_options() const {
  // The wrapper's group options are what the user and the schedulers set; a learning
  // rate set on the inner optimizer's group since the last step is taken over first.
  auto& inner_groups = inner_->param_groups();
  pushed_lrs_.resize(inner_groups.size(), -1);
  for (size_t i = 0; i < param_groups_.size() && i < inner_groups.size(); ++i) {
    auto& mine = const_cast<torch::optim::OptimizerOptions&>(param_groups_[i].options());
    auto& theirs = inner_groups[i].options();
    if (pushed_lrs_[i] >= 0 && theirs.get_lr() != pushed_lrs_[i]) assign_options(theirs, mine);
    assign_options(mine, theirs);
    pushed_lrs_[i] = theirs.get_lr();
  }
}

torch::Tensor DistributedOptimizer::inner_step(const LossClosure& closure) {
  refresh_views();
  sync_group_options();
  return inner_->step(closure);
}

Fingerprint DistributedOptimizer::exchange_fingerprint() const {
  Fingerprint fp = flat_->fingerprint();
  fp.set("start", start_ == Start::kCheck ? "check" : "broadcast");
  for (size_t i = 0; i < buffers_.size(); ++i) {
    fp.add("buffer " + buffer_names_[i], buffers_[i].sizes(), buffers_[i].scalar_type());
  }
  return fp;
}

void DistributedOptimizer::start_equal(World& world, int root) {
  if (world.size() < 2) return;
  torch::NoGradGuard no_grad;
  refresh_views();
  // One byte vector: the parameters, then every buffer.
  std::vector<at::Tensor> all{flat_->flat()};
  all.insert(all.end(), buffers_.begin(), buffers_.end());
  at::Tensor mine = detail::pack_bytes(all);
  at::Tensor theirs = start_ == Start::kCheck ? mine.clone() : mine;
  broadcast(world, theirs, root, /*tag=*/7201);
  if (start_ == Start::kBroadcast) {
    detail::unpack_bytes(theirs, all);
    return;
  }
  // Start::kCheck: the first tensor (parameters in order, then buffers) that differs on
  // some rank, and which ranks differ.
  const int64_t none = std::numeric_limits<int64_t>::max();
  int64_t first = none;
  {
    int64_t at = 0, index = 0;
    auto compare = [&](const at::Tensor& t) {
      const int64_t n = t.numel() * static_cast<int64_t>(t.element_size());
      if (first == none && !torch::equal(mine.narrow(0, at, n), theirs.narrow(0, at, n))) first = index;
      at += n;
      ++index;
    };
    for (size_t i = 0; i < flat_->params().size(); ++i) compare(flat_->params()[i]);
    for (const auto& b : buffers_) compare(b);
  }
  at::Tensor first_t = torch::full({1}, first, torch::kLong);
  all_reduce(world, first_t, ReduceOp::kMin, /*tag=*/7202);
  at::Tensor differ = torch::zeros({world.size()}, torch::kLong);
  if (first != none) differ[world.rank()] = 1;
  all_reduce(world, differ, ReduceOp::kSum, /*tag=*/7203);
  const int64_t worst = first_t.item<int64_t>();
  if (worst == none) return;
  std::vector<int> ranks;
  for (int r = 0; r < world.size(); ++r) {
    if (differ[r].item<int64_t>() != 0) ranks.push_back(r);
  }
  const size_t np = flat_->params().size();
  const std::string what = static_cast<size_t>(worst) < np
                               ? fmt::format("parameter '{}'", flat_->names()[static_cast<size_t>(worst)])
                               : fmt::format("buffer '{}'", buffer_names_[static_cast<size_t>(worst) - np]);
  throw MismatchError(fmt::format(
      "rank {}: {}: the ranks' models differ: {} on rank{} {} is not rank {}'s (Start::kCheck asks "
      "for equal models). Seed every rank alike, load the same checkpoint everywhere, or leave "
      "Model::start at Start::kBroadcast to take rank {}'s",
      world.rank(), algorithm_, what, ranks.size() > 1 ? "s" : "", fmt::join(ranks, ", "), root, root));
}

void DistributedOptimizer::average_model(World& world) {
  if (world.size() < 2) return;
  torch::NoGradGuard no_grad;
  refresh_views();
  // Parameters and floating-point buffers: their mean, reduced in double precision.
  std::vector<at::Tensor> floats{flat_->flat().to(torch::kCPU, torch::kDouble).reshape({-1})};
  std::vector<at::Tensor> ints;
  for (const auto& b : buffers_) {
    if (at::isFloatingType(b.scalar_type())) {
      floats.push_back(b.to(torch::kCPU, torch::kDouble).reshape({-1}));
    } else {
      ints.push_back(b);
    }
  }
  at::Tensor mean = torch::cat(floats);
  try {
    all_reduce(world, mean, ReduceOp::kSum, /*tag=*/7101);
  } catch (const CommError& e) {
    throw CommError(fmt::format("{} ({}: averaging the models over the ranks)", e.what(), algorithm_));
  }
  mean.div_(world.size());
  int64_t at = 0;
  auto take = [&](const at::Tensor& into) {
    into.copy_(mean.narrow(0, at, into.numel()).view(into.sizes()));
    at += into.numel();
  };
  take(flat_->flat());
  for (auto& b : buffers_) {
    if (at::isFloatingType(b.scalar_type())) take(b);
  }
  if (ints.empty()) return;
  // Integer buffers (BatchNorm's batch count): rank 0's.
  at::Tensor bytes = detail::pack_bytes(ints);
  broadcast(world, bytes, 0, /*tag=*/7102);
  detail::unpack_bytes(bytes, ints);
}

void DistributedOptimizer::save(torch::serialize::OutputArchive& archive) const {
  const std::string prefix = "torch_asgd/" + algorithm_;
  detail::write_fingerprint(archive, prefix, flat_->fingerprint());
  detail::write_string(archive, prefix + "/rule", rule_name_);
  if (inner_) {
    sync_group_options();
    torch::serialize::OutputArchive inner_archive;
    inner_->save(inner_archive);
    archive.write(prefix + "/inner", inner_archive);
    detail::write_group_lrs(archive, prefix, inner_->param_groups());
  }
  save_state(archive);
}

void DistributedOptimizer::load(torch::serialize::InputArchive& archive) {
  const std::string prefix = "torch_asgd/" + algorithm_;
  detail::check_fingerprint(archive, prefix, flat_->fingerprint(), algorithm_);
  const std::string rule = detail::read_string(archive, prefix + "/rule");
  if (rule != rule_name_) {
    throw MismatchError(fmt::format(
        "{}: the checkpoint was written with {} as the local rule, but this optimizer's is {}; "
        "resume with the same inner optimizer",
        algorithm_, rule, rule_name_));
  }
  if (!inner_) {
    load_state(archive);
    return;
  }
  torch::serialize::InputArchive inner_archive;
  archive.read(prefix + "/inner", inner_archive);
  // What loading changes is kept, so that a checkpoint refused part way (by a check of
  // the wrapper's state, or by the inner optimizer's own load) leaves this optimizer as it
  // was: LibTorch's loads replace the per-parameter states (a clone shares the tensors,
  // which a load does not write), and the learning rates are read here. A state that
  // cannot be cloned (a rule's own, not derived from OptimizerCloneableParamState) is
  // loaded as before, without the undo.
  auto& groups = inner_->param_groups();
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;
  for (const auto& g : groups) options.push_back(g.options().clone());
  std::remove_reference_t<decltype(inner_->state())> state;
  bool undoable = true;
  try {
    for (const auto& [key, s] : inner_->state()) state.emplace(key, s->clone());
  } catch (const c10::Error&) {
    undoable = false;
    state.clear();
  }
  try {
    inner_->load(inner_archive);
    detail::read_group_lrs(archive, prefix, groups);
    load_state(archive);  // checks everything before it changes anything
  } catch (...) {
    if (undoable) inner_->state() = std::move(state);
    // In place (by value), so that a reference to an inner group's options stays valid.
    for (size_t i = 0; i < groups.size(); ++i) assign_options(*options[i], groups[i].options());
    throw;
  }
  // What was loaded is what the wrapper's groups say now.
  pushed_lrs_.clear();
  for (size_t i = 0; i < param_groups_.size() && i < groups.size(); ++i) {
    assign_options(groups[i].options(), param_groups_[i].options());
    pushed_lrs_.push_back(groups[i].options().get_lr());
  }
}

namespace detail {

std::shared_ptr<torch::optim::Optimizer> make_sgd(std::vector<torch::optim::OptimizerParamGroup> groups,
                                                  const torch::optim::SGDOptions& defaults) {
  return std::make_shared<torch::optim::SGD>(std::move(groups), defaults);
}

}  // namespace detail
}  // namespace torch_asgd
