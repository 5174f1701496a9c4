// ShmCommunicator: all-reduce and all-gather through one shared-memory segment for the ranks of a
// tensor-parallel group that share a machine (torch.classes.pagedserve.ShmCommunicator).
//
// gloo sends a collective over loopback TCP, tens of microseconds per call for a decode step's small
// [rows, hidden] tensor, and a decoder layer makes two. Ranks on one host can meet in memory instead:
// each copies its tensor into its own slot of the segment, announces it, waits until every rank has,
// and then reads the others' slots (all-reduce: sums them in rank order, so every rank gets bitwise
// the same result; all-gather: copies them side by side).
//
// Rank 0 creates the segment (a file in /dev/shm), the others open it by the name rank 0 sends them;
// once every rank has it mapped, rank 0 unlinks the name, so nothing is left behind whatever happens.
// A wait never lasts forever: it fails after `timeout_seconds`, or within 10 ms when a peer's process is
// gone (each rank holds a record lock on its own byte of the segment, which the kernel drops at exit).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

namespace pagedserve {

struct ShmHeader;

class ShmCommunicator : public torch::CustomClassHolder {
 public:
  // `name`: the segment's file name under /dev/shm; `create`: this rank makes it (rank 0 of the group);
  // `slot_bytes`: what one rank publishes per round (larger tensors go in several rounds).
  ShmCommunicator(std::string name, int64_t rank, int64_t world_size, int64_t slot_bytes, bool create,
                  double timeout_seconds);
  ~ShmCommunicator() override;

  // x (float32, bfloat16 or float16, contiguous) becomes the sum of every rank's x, in place.
  void all_reduce(at::Tensor x);
  // x [..., cols] (any dtype, contiguous) -> [..., world_size * cols], rank r's x in columns r * cols...
  at::Tensor all_gather(at::Tensor x);
  // Remove the segment's name (the creator, once every rank has opened it); the mapping stays.
  void unlink();

 private:
  uint8_t* slot(uint64_t round, int64_t rank) const;
  void publish_and_wait(const uint8_t* src, int64_t num_bytes);
  bool all_arrived(uint32_t target) const;
  void wait_for_all(uint32_t target);          // hands a wait to the waiter thread
  void waiter_loop();
  void wait_for(int64_t peer, uint32_t target);  // sleeps on the peer's count (the waiter thread)
  bool peer_is_alive(int64_t peer) const;
  void release();   // unmap, close, unlink if still linked

  std::string name_;
  int64_t rank_;
  int64_t world_size_;
  int64_t slot_bytes_;
  bool is_linked_;
  std::chrono::duration<double> timeout_;
  int fd_ = -1;
  size_t mapped_bytes_ = 0;
  uint8_t* base_ = nullptr;
  ShmHeader* header_ = nullptr;
  uint64_t num_rounds_ = 0;   // rounds this rank has published (every rank advances in step)
  bool is_broken_ = false;    // a round failed: the ranks are out of step for good
  // The waiter thread and its hand-off (under mutex_): the caller asks for `request_`, sleeps until done.
  std::thread waiter_;
  std::mutex mutex_;
  std::condition_variable wake_waiter_;
  std::condition_variable request_done_;
  uint32_t request_ = 0;
  bool has_request_ = false;
  bool is_stopping_ = false;
  std::exception_ptr waiter_error_;
};

}  // namespace pagedserve
