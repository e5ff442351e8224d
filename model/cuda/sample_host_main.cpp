// The host build of sample.cu (host_emulation.h) as a program, for
// model/tests/sample_kernel_emulated.rs. Reads from stdin: i32 rows, vocab, limit; f32 logits
// [rows × vocab]; f64 settings [rows × PARAM_COLS]. Writes the f32 results [rows × OUT_COLS] to
// stdout. One block (THREADS threads) per row, one row at a time.
#define TGA_HOST_EMULATION
#include "sample.cu"

#include <cstdio>
#include <vector>

thread_local Dim3 threadIdx;
Dim3 blockIdx;
pthread_barrier_t emu_block_barrier;
pthread_barrier_t emu_warp_barrier[32];
unsigned long long emu_lanes[32][32];

namespace {
struct Launch {
    const float *logits;
    const double *params;
    float *out;
    int rows, vocab, limit;
    unsigned tid;
};

// One CUDA thread: the blocks one after another (a barrier of the block between two).
void *thread_main(void *arg) {
    const Launch *l = static_cast<const Launch *>(arg);
    threadIdx.x = l->tid;
    for (int r = 0; r < l->rows; ++r) {
        if (l->tid == 0) blockIdx.x = r;
        pthread_barrier_wait(&emu_block_barrier);
        sample_rows_f32(l->logits, l->params, l->out, l->vocab, l->limit);
        pthread_barrier_wait(&emu_block_barrier);
    }
    return nullptr;
}

bool read_all(void *dst, size_t bytes) { return std::fread(dst, 1, bytes, stdin) == bytes; }
}  // namespace

int main() {
    int header[3];
    if (!read_all(header, sizeof header)) return 2;
    const int rows = header[0], vocab = header[1], limit = header[2];
    std::vector<float> logits((size_t)rows * vocab);
    std::vector<double> params((size_t)rows * PARAM_COLS);
    if (!read_all(logits.data(), logits.size() * sizeof(float))) return 2;
    if (!read_all(params.data(), params.size() * sizeof(double))) return 2;
    std::vector<float> out((size_t)rows * OUT_COLS, NAN);
    pthread_barrier_init(&emu_block_barrier, nullptr, THREADS);
    for (int w = 0; w < WARPS; ++w) pthread_barrier_init(&emu_warp_barrier[w], nullptr, 32);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    std::vector<pthread_t> threads(THREADS);
    std::vector<Launch> launches(THREADS);
    for (unsigned t = 0; t < THREADS; ++t) {
        launches[t] = {logits.data(), params.data(), out.data(), rows, vocab, limit, t};
        if (pthread_create(&threads[t], &attr, thread_main, &launches[t]) != 0) return 3;
    }
    for (unsigned t = 0; t < THREADS; ++t) pthread_join(threads[t], nullptr);
    std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    return 0;
}
