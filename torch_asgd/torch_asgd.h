// torch_asgd: asynchronous distributed optimizers for LibTorch.
// Include this header for everything, or a single concept header.
#pragma once

#include "torch_asgd/comm/channel.h"
#include "torch_asgd/comm/collectives.h"
#include "torch_asgd/comm/env.h"
#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/fingerprint.h"
#include "torch_asgd/comm/metadata.h"
#include "torch_asgd/comm/transport.h"
#include "torch_asgd/comm/wire.h"
#include "torch_asgd/comm/world.h"
#include "torch_asgd/optim/asgrad_worker.h"
#include "torch_asgd/optim/dasgd.h"
#include "torch_asgd/optim/distributed_optimizer.h"
#include "torch_asgd/optim/gossip.h"
#include "torch_asgd/optim/job_policy.h"
#include "torch_asgd/optim/lead.h"
#include "torch_asgd/optim/local.h"
#include "torch_asgd/optim/parameter_server.h"
#include "torch_asgd/optim/staleness.h"
#include "torch_asgd/optim/stats.h"
#include "torch_asgd/optim/sync_sgd.h"
