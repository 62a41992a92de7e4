#include <gtest/gtest.h>

#include "torch_asgd/comm/env.h"
#include "torch_asgd/comm/error.h"

namespace torch_asgd {
namespace {

using Vars = std::map<std::string, std::string>;

std::string error_of(const Vars& vars) {
  try {
    WorldOptions::from_env(vars);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(Env, NoLauncherIsAWorldOfOne) {
  auto o = WorldOptions::from_env(Vars{});
  EXPECT_EQ(o.rank, 0);
  EXPECT_EQ(o.world_size, 1);
  EXPECT_EQ(o.source, "");
  EXPECT_EQ(o.job_id, "default");
}

TEST(Env, Torchrun) {
  auto o = WorldOptions::from_env(Vars{{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                                       {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "10.1.2.3"},
                                       {"MASTER_PORT", "29511"}, {"TORCHELASTIC_RUN_ID", "abc"},
                                       {"GLOO_SOCKET_IFNAME", "eth1,eth2"}});
  EXPECT_EQ(o.source, "torchrun");
  EXPECT_EQ(o.rank, 3);
  EXPECT_EQ(o.world_size, 8);
  EXPECT_EQ(o.local_rank, 1);
  EXPECT_EQ(o.local_world_size, 2);
  EXPECT_EQ(o.master_addr, "10.1.2.3");
  EXPECT_EQ(o.master_port, 29511);
  EXPECT_EQ(o.job_id, "abc");
  EXPECT_EQ(o.iface, "eth1");
  EXPECT_FALSE(o.use_agent_store);
}

TEST(Env, TorchrunWinsOverSlurmAndOpenMpi) {
  auto o = WorldOptions::from_env(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                       {"MASTER_PORT", "1234"}, {"SLURM_PROCID", "5"},
                                       {"SLURM_NTASKS", "9"}, {"OMPI_COMM_WORLD_RANK", "7"},
                                       {"OMPI_COMM_WORLD_SIZE", "9"}});
  EXPECT_EQ(o.source, "torchrun");
  EXPECT_EQ(o.rank, 1);
  EXPECT_EQ(o.world_size, 2);
}

TEST(Env, AgentStore) {
  auto o = WorldOptions::from_env(Vars{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                       {"MASTER_PORT", "1234"},
                                       {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  EXPECT_TRUE(o.use_agent_store);
}

TEST(Env, Slurm) {
  auto o = WorldOptions::from_env(Vars{{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"},
                                       {"SLURM_LOCALID", "1"}, {"SLURM_NTASKS_PER_NODE", "4(x2)"},
                                       {"SLURM_JOB_NODELIST", "gpu[07-08,11],cpu1"},
                                       {"SLURM_JOB_ID", "123456"}, {"SLURM_STEP_ID", "2"}});
  EXPECT_EQ(o.source, "slurm");
  EXPECT_EQ(o.rank, 5);
  EXPECT_EQ(o.world_size, 8);
  EXPECT_EQ(o.local_rank, 1);
  EXPECT_EQ(o.local_world_size, 4);
  EXPECT_EQ(o.master_addr, "gpu07");
  EXPECT_EQ(o.master_port, 20000 + 123456 % 10000);
  EXPECT_EQ(o.job_id, "slurm-123456.2");
}

TEST(Env, SlurmWinsOverOpenMpi) {
  auto o = WorldOptions::from_env(Vars{{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"},
                                       {"OMPI_COMM_WORLD_RANK", "3"},
                                       {"OMPI_COMM_WORLD_SIZE", "4"}});
  EXPECT_EQ(o.source, "slurm");
}

TEST(Env, OpenMpi) {
  auto o = WorldOptions::from_env(Vars{{"OMPI_COMM_WORLD_RANK", "2"},
                                       {"OMPI_COMM_WORLD_SIZE", "4"},
                                       {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
                                       {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
  EXPECT_EQ(o.source, "openmpi");
  EXPECT_EQ(o.rank, 2);
  EXPECT_EQ(o.world_size, 4);
  EXPECT_EQ(o.master_addr, "127.0.0.1");  // all ranks on this node
  EXPECT_EQ(o.master_port, 29500);
}

TEST(Env, RankNotBelowWorldSize) {
  auto e = error_of(Vars{{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "h"},
                         {"MASTER_PORT", "1"}});
  EXPECT_NE(e.find("RANK=4 is out of range for WORLD_SIZE=4"), std::string::npos) << e;
  EXPECT_NE(e.find("torchrun"), std::string::npos) << e;
}

TEST(Env, MissingMasterAddr) {
  auto e = error_of(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"}});
  EXPECT_NE(e.find("MASTER_ADDR is not set"), std::string::npos) << e;
  EXPECT_NE(e.find("rank 1"), std::string::npos) << e;
}

TEST(Env, MissingOrBadPort) {
  EXPECT_NE(error_of(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}})
                .find("MASTER_PORT=-1 is not a TCP port"),
            std::string::npos);
  EXPECT_NE(error_of(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                          {"MASTER_PORT", "70000"}})
                .find("MASTER_PORT=70000"),
            std::string::npos);
}

TEST(Env, OnlyOneOfRankAndWorldSize) {
  auto e = error_of(Vars{{"RANK", "1"}});
  EXPECT_NE(e.find("WORLD_SIZE is not"), std::string::npos) << e;
}

TEST(Env, NotAnInteger) {
  auto e = error_of(Vars{{"RANK", "one"}, {"WORLD_SIZE", "2"}});
  EXPECT_NE(e.find("RANK='one' is not an integer"), std::string::npos) << e;
}

TEST(Env, BadTimeout) {
  auto e = error_of(Vars{{"TORCH_ASGD_TIMEOUT", "-3"}});
  EXPECT_NE(e.find("TORCH_ASGD_TIMEOUT"), std::string::npos) << e;
  auto o = WorldOptions::from_env(Vars{{"TORCH_ASGD_TIMEOUT", "2.5"}});
  EXPECT_EQ(o.timeout.count(), 2500);
}

TEST(Env, FileStoreNeedsNoMaster) {
  auto o = WorldOptions::from_env(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"},
                                       {"TORCH_ASGD_STORE_PATH", "/shared/rdzv"}});
  EXPECT_EQ(o.store_path, "/shared/rdzv");
}

TEST(Env, ExplicitOptionsOverrideTheEnvironment) {
  auto env = WorldOptions::from_env(Vars{{"RANK", "1"}, {"WORLD_SIZE", "2"},
                                         {"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}});
  WorldOptions x;
  x.rank = 0;
  x.world_size = 1;
  x.job_id = "mine";
  auto o = env.merged_with(x);
  EXPECT_EQ(o.rank, 0);
  EXPECT_EQ(o.world_size, 1);
  EXPECT_EQ(o.local_rank, 0);
  EXPECT_EQ(o.job_id, "mine");
  EXPECT_EQ(o.source, "options");

  WorldOptions bad;
  bad.rank = 5;
  EXPECT_THROW(env.merged_with(bad), ConfigError);
}

}  // namespace
}  // namespace torch_asgd
