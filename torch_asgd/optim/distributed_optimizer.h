// DistributedOptimizer: what every torch_asgd optimizer is, a torch::optim::Optimizer
// around an inner torch::optim::Optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, or the
// user's own) built over the same parameters, whose step() is the local rule
// (docs/algorithms.md, "The local rule"). One contract for every algorithm:
//
//   auto opt = std::make_unique<torch_asgd::DASGD>(inner, torch_asgd::DASGDOptions(),
//                                                  world, model);   // or Gossip, SyncSGD, ...
//   torch_asgd::DistributedOptimizer& o = *opt;
//   while (!o.done() && ...) { o.zero_grad(); loss.backward(); o.step(); }
//   o.finish();                         // every algorithm; bounded
//   std::cout << o.stats()->str();      // "DASGD rank 0/4: ..."
//
// - The start is equal, as DDP's: construction is collective, and every rank takes rank
//   0's parameters and buffers (the server's, for the AsGrad family), or, with
//   Model::start(Start::kCheck), ranks whose models differ are refused, every rank
//   throwing MismatchError that names the first tensor that differs.
// - Buffers (BatchNorm's running statistics) are not parameters, so give the optimizer
//   the module (Model) to have them handled: equal at start in every algorithm, then as
//   each algorithm's header says (averaged by resync() and by gossip's mixing, rank 0's
//   after every SyncSGD step, each rank's own in DASGD and on AsGrad workers).
// - Its parameter groups are the inner one's: the same parameters, and copies of the
//   inner groups' options of the same type (static_cast<torch::optim::SGDOptions&>(
//   group.options()) is valid), which reach the inner optimizer at the next step(): an LR
//   scheduler attached to the wrapper drives the inner optimizer. A learning rate set on
//   the inner optimizer's group directly is taken over too. zero_grad() clears the same
//   gradients.
// - save()/load() (torch::save/torch::load) carry the inner state (momentum buffers,
//   Adam's moments and step counts) with the wrapper's own; load() refuses a checkpoint
//   written for another model or another local rule, naming the difference.
// - Groups cannot be added afterwards (every rank would have to add the same one at the
//   same point): add_param_group() throws ConfigError, and a group added to the inner
//   optimizer is refused at the next step().
// - An optimizer that needs a closure evaluated several times per step (LBFGS) is
//   refused at construction.
// - With one rank every torch_asgd optimizer is exactly its inner optimizer.
// - The World: when none is given and the process was started by a launcher (torchrun,
//   asgd-launch, Slurm, Open MPI) for a job of several ranks, the process's default World
//   (World::from_env(), made once and shared) is used; with no launcher, one rank.
// - Destruction: an optimizer with something to deliver that was not finish()ed warns
//   and finishes with a 10 s bound; destructors never wait longer.
//
// At construction the parameters become views into one flat buffer (flat_params.h):
// build the optimizer after moving the model to its device.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/sgd.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>

#include "torch_asgd/comm/fingerprint.h"
#include "torch_asgd/optim/stats.h"

namespace torch_asgd {
class World;
namespace detail {
class FlatParams;
}

// How the ranks' models are made equal when an optimizer is built.
enum class Start {
  kBroadcast,  // every rank takes rank 0's parameters and buffers, as DDP does (default)
  kCheck,      // they must be equal already, bit for bit; if not, every rank throws
               // MismatchError naming the first tensor that differs and the ranks
};

// The model an optimizer keeps equal across ranks, beside the parameters its inner
// optimizer holds: the parameters' names (for messages and checkpoints) and the module's
// buffers. Made implicitly from a module (`model`, `*model`, a shared_ptr) or from the
// parameters' names, as older code passes them.
class Model {
 public:
  Model() = default;
  Model(std::vector<std::string> parameter_names) : names_(std::move(parameter_names)) {}  // NOLINT
  Model(const torch::nn::Module& module);  // NOLINT: named parameters and buffers
  template <typename M, typename = std::enable_if_t<std::is_base_of_v<torch::nn::Module, M>>>
  Model(const std::shared_ptr<M>& module) : Model(static_cast<const torch::nn::Module&>(*module)) {}  // NOLINT
  template <typename M>
  Model(const torch::nn::ModuleHolder<M>& module) : Model(*module.ptr()) {}  // NOLINT

  Model& start(Start s) {
    start_ = s;
    return *this;
  }
  Start start() const { return start_; }

  // The names given, or the module's.
  const std::vector<std::string>& names() const { return names_; }
  // The module's parameters, by name (empty when only names were given).
  const torch::OrderedDict<std::string, torch::Tensor>& named_parameters() const { return parameters_; }
  const torch::OrderedDict<std::string, torch::Tensor>& buffers() const { return buffers_; }

 private:
  std::vector<std::string> names_;
  torch::OrderedDict<std::string, torch::Tensor> parameters_;
  torch::OrderedDict<std::string, torch::Tensor> buffers_;
  Start start_ = Start::kBroadcast;
};

// The parameters of the shorthand constructors (an inner torch::optim::SGD): a list of
// tensors, named parameters (their names kept), or parameter groups.
class Params {
 public:
  Params(std::vector<torch::Tensor> params);                                 // NOLINT
  Params(const torch::OrderedDict<std::string, torch::Tensor>& named_params);  // NOLINT
  Params(std::vector<torch::optim::OptimizerParamGroup> groups);            // NOLINT

  std::vector<torch::optim::OptimizerParamGroup> take_groups() { return std::move(groups_); }
  std::vector<torch::Tensor> take_tensors();  // every group's, in order
  // `model`, or, when it names nothing and these parameters came with names, those names.
  Model names_or(Model model) const;

 private:
  std::vector<torch::optim::OptimizerParamGroup> groups_;
  std::vector<std::string> names_;
};

class DistributedOptimizer : public torch::optim::Optimizer {
 public:
  ~DistributedOptimizer() override;

  // The local rule (ConfigError for an AsGrad worker, which has none).
  torch::optim::Optimizer& inner();
  const torch::optim::Optimizer& inner() const;
  // Its type, as "torch::optim::Adam" ("none" for an AsGrad worker).
  const std::string& rule_name() const { return rule_name_; }
  // "DASGD", "Gossip", "SyncSGD", "ParameterServer", "AsGradWorker".
  const std::string& algorithm() const { return algorithm_; }

  // Ends this rank's training: what it still has to send is sent and what its peers
  // send until they finish is applied, bounded by `timeout` (each algorithm's header
  // says what it waits for). Returns false if some peer did not finish in time. step()
  // afterwards throws ConfigError. A second call returns true at once.
  virtual bool finish(std::chrono::milliseconds timeout = std::chrono::seconds(60)) = 0;

  // Collective (every rank, the same point): the ranks' parameters and floating-point
  // buffers become their mean over the ranks (integer buffers: rank 0's), and what the
  // algorithm counts starts again from there. For resuming from checkpoints written at
  // different moments: after load(), before the first step.
  virtual void resync() = 0;

  // True once this rank takes no more steps because the job says so: an AsGrad worker
  // after the server ended training, the server once it has. Otherwise false (a rank's
  // own budget decides).
  virtual bool done() const { return false; }

  // This rank's counters; the derived classes' stats() return their own type.
  std::unique_ptr<OptimizerStats> stats() const { return stats_snapshot(); }

  // Refused: see above.
  void add_param_group(const torch::optim::OptimizerParamGroup& group);

  void save(torch::serialize::OutputArchive& archive) const override;
  // Throws MismatchError for a checkpoint of another model, rule or optimizer; a
  // checkpoint refused leaves this optimizer, a LibTorch inner one included, as it was.
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  // `algorithm` names the wrapper in errors, statistics and checkpoints ("DASGD").
  DistributedOptimizer(std::shared_ptr<torch::optim::Optimizer> inner, std::string algorithm,
                       Model model);
  // Without a local rule: the AsGrad worker, whose parameters a server steps.
  DistributedOptimizer(std::vector<torch::Tensor> params, std::string algorithm, Model model);

  // `world` as given, or the process's default World when a launcher started this
  // process for a job of several ranks (nullptr otherwise).
  static std::shared_ptr<World> world_or_default(std::shared_ptr<World> world);

  // Collective: makes every rank's parameters and buffers equal to rank `root`'s, or,
  // under Start::kCheck, checks that they are (MismatchError on every rank if not).
  void start_equal(World& world, int root);
  // Collective: the mean of the ranks' parameters and floating-point buffers (integer
  // buffers: rank 0's).
  void average_model(World& world);
  // What the ranks must agree on before they exchange anything: the parameters' and the
  // buffers' names, shapes and dtypes (checked when a channel opens).
  Fingerprint exchange_fingerprint() const;
  // The module's buffers (empty if none were given).
  const std::vector<at::Tensor>& buffers() const { return buffers_; }
  const std::vector<std::string>& buffer_names() const { return buffer_names_; }

  // Makes the parameters views of the flat buffer again if something (torch::load of the
  // module) gave them storage of their own; true if it did. Throws ConfigError when
  // parameters were added or moved to another device.
  bool refresh_views();
  // The inner step, after refresh_views().
  torch::Tensor inner_step(const LossClosure& closure);

  // The wrapper's own state beside the inner one's. load_state() reads and checks
  // everything before it changes anything (load() undoes the inner optimizer's load when
  // it throws).
  virtual void save_state(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load_state(torch::serialize::InputArchive& archive) = 0;
  virtual std::unique_ptr<OptimizerStats> stats_snapshot() const = 0;

  // The destructor policy, for the derived destructors: if finish() was not called,
  // warn that `rank` is finishing now and finish with a 10 s bound; never throws.
  void finish_in_destructor(int rank) noexcept;
  // Set by finish(); step() after it throws.
  bool finished_ = false;
  void throw_if_finished() const;

  detail::FlatParams& flat() { return *flat_; }
  const detail::FlatParams& flat() const { return *flat_; }

 private:
  void init_model(const Model& model);
  void sync_group_options() const;

  std::shared_ptr<torch::optim::Optimizer> inner_;
  std::string algorithm_;
  std::string rule_name_;
  std::unique_ptr<detail::FlatParams> flat_;
  Start start_ = Start::kBroadcast;
  std::vector<at::Tensor> buffers_;
  std::vector<std::string> buffer_names_;
  mutable std::vector<double> pushed_lrs_;  // the inner groups' learning rates as last set
};

namespace detail {
// An inner torch::optim::SGD over `groups` with `defaults`: the shorthand constructors.
std::shared_ptr<torch::optim::Optimizer> make_sgd(std::vector<torch::optim::OptimizerParamGroup> groups,
                                                  const torch::optim::SGDOptions& defaults);
}  // namespace detail

}  // namespace torch_asgd
