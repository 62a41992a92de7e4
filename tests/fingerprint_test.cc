#include <gtest/gtest.h>

#include "torch_asgd/comm/error.h"
#include "torch_asgd/comm/fingerprint.h"

namespace torch_asgd {
namespace {

Fingerprint net() {
  Fingerprint fp;
  fp.add("conv1.weight", {10, 1, 5, 5}, c10::kFloat)
      .add("conv1.bias", {10}, c10::kFloat)
      .add("fc1.weight", {50, 320}, c10::kFloat);
  fp.set("algo", "dasgd");
  return fp;
}

TEST(Fingerprint, EqualHasNoDifference) {
  EXPECT_EQ(net().first_difference(net(), "on rank 1"), "");
  EXPECT_EQ(Fingerprint::parse(net().serialize()), net());
}

TEST(Fingerprint, NamesTheFirstParameterWithAnotherShape) {
  Fingerprint other;
  other.add("conv1.weight", {10, 1, 5, 5}, c10::kFloat)
      .add("conv1.bias", {10}, c10::kFloat)
      .add("fc1.weight", {50, 321}, c10::kFloat);
  other.set("algo", "dasgd");
  EXPECT_EQ(net().first_difference(other, "on rank 3"),
            "parameter 'fc1.weight' has shape [50, 320] here but [50, 321] on rank 3");
}

TEST(Fingerprint, DtypeNameCountAndProperty) {
  Fingerprint dtype;
  dtype.add("conv1.weight", {10, 1, 5, 5}, c10::kDouble);
  EXPECT_EQ(net().first_difference(dtype, "on rank 1"),
            "parameter 'conv1.weight' has dtype Float here but Double on rank 1");
  Fingerprint unset = net();
  unset = Fingerprint();
  unset.add("conv1.weight", {10, 1, 5, 5}, c10::kFloat)
      .add("conv1.bias", {10}, c10::kFloat)
      .add("fc1.weight", {50, 320}, c10::kFloat);
  EXPECT_EQ(net().first_difference(unset, "on rank 1"), "algo is 'dasgd' here but '<unset>' on rank 1");

  Fingerprint renamed = net();
  renamed = Fingerprint();
  renamed.add("conv0.weight", {10, 1, 5, 5}, c10::kFloat).set("algo", "dasgd");
  EXPECT_NE(net().first_difference(renamed, "on rank 2").find("parameter #0 is 'conv1.weight'"),
            std::string::npos);

  Fingerprint shorter;
  shorter.add("conv1.weight", {10, 1, 5, 5}, c10::kFloat)
      .add("conv1.bias", {10}, c10::kFloat)
      .set("algo", "dasgd");
  EXPECT_EQ(net().first_difference(shorter, "on rank 1"),
            "3 parameters here but 2 on rank 1: first unmatched is 'fc1.weight' Float [50, 320] "
            "(only here)");
  EXPECT_EQ(shorter.first_difference(net(), "in the checkpoint"),
            "2 parameters here but 3 in the checkpoint: first unmatched is 'fc1.weight' Float "
            "[50, 320] (only in the checkpoint)");

  Fingerprint algo = net();
  algo.set("algo", "gossip");
  EXPECT_EQ(net().first_difference(algo, "on rank 4"), "algo is 'dasgd' here but 'gossip' on rank 4");
}

TEST(Fingerprint, CorruptTextIsRefused) {
  EXPECT_THROW(Fingerprint::parse("hello"), MismatchError);
  EXPECT_THROW(Fingerprint::parse("torch_asgd-fingerprint-1\nno tabs here\n"), MismatchError);
  EXPECT_THROW(Fingerprint::parse("torch_asgd-fingerprint-1\nw\tx\t1,2\n"), MismatchError);
}

TEST(Fingerprint, RejectsNamesThatCannotBeSerialized) {
  Fingerprint fp;
  EXPECT_THROW(fp.add("bad\tname", {1}, c10::kFloat), ConfigError);
  EXPECT_THROW(fp.set("k=v", "x"), ConfigError);
}

}  // namespace
}  // namespace torch_asgd
