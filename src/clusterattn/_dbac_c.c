/* Compiled kernel of clusterattn.dbac_compiled: DBAC variant A's int32 ranking key on CPU.
 *
 * ClusterAttn (Zhang et al., ACL 2025). Per row of int32 bit patterns of float32 window scores,
 * this computes in one call what the tensor path (clusterattn.dbac._dbac_plain) needs about twenty
 * tensor ops for: each block's peak (with the density threshold), the num_block highest peaks
 * (equal peaks: the later block first), each chosen block's span from its first arg-max, and the key
 * (the score's bits inside the spans, bits - 2**31 elsewhere). The final top-budget stays torch's
 * own topk on that key, so the kept indices are the tensor path's, ties included.
 *
 * A plain C extension (no numpy or torch headers): arrays come in through the buffer protocol.
 * It is built when the package is installed, if a C compiler is there (setup.py: optional);
 * without it the tensor path runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FINITE_BITS 0x7F800000u /* bits of +inf: a plain score's bits, as uint32, lie below it */

/* Sift the smallest of heap[0..size) to the root (a min-heap of unique codes). */
static void sift_down(int64_t *heap, Py_ssize_t size, Py_ssize_t at) {
    for (;;) {
        Py_ssize_t low = at, left = 2 * at + 1, right = left + 1;
        if (left < size && heap[left] < heap[low]) low = left;
        if (right < size && heap[right] < heap[low]) low = right;
        if (low == at) return;
        int64_t swap = heap[at];
        heap[at] = heap[low];
        heap[low] = swap;
        at = low;
    }
}

/* One row: returns 0 when a score is not plain (sign bit set, inf or NaN), else 1. */
static int row_key(const int32_t *row, int32_t *out, Py_ssize_t n, Py_ssize_t blk, int32_t theta_bits,
                   Py_ssize_t k, Py_ssize_t before, int64_t *heap) {
    const uint32_t *row_u = (const uint32_t *)row;
    Py_ssize_t n_blocks = (n + blk - 1) / blk, size = 0;
    uint32_t worst = 0;
    for (Py_ssize_t b = 0; b < n_blocks; b++) {
        Py_ssize_t lo = b * blk, hi = lo + blk < n ? lo + blk : n;
        uint32_t top = 0;
        for (Py_ssize_t i = lo; i < hi; i++) top = row_u[i] > top ? row_u[i] : top;
        worst = top > worst ? top : worst;
        int64_t peak = (int32_t)top < theta_bits ? INT32_MIN : (int32_t)top;
        int64_t code = peak * 4294967296LL + b; /* unique; equal peaks rank the later block higher */
        if (size < k) {
            heap[size++] = code;
            if (size == k)
                for (Py_ssize_t at = k / 2; at-- > 0;) sift_down(heap, k, at);
        } else if (code > heap[0]) {
            heap[0] = code;
            sift_down(heap, k, 0);
        }
    }
    if (worst >= FINITE_BITS) return 0;
    for (Py_ssize_t i = 0; i < n; i++) out[i] = row[i] ^ INT32_MIN;
    for (Py_ssize_t c = 0; c < size; c++) {
        if ((heap[c] >> 32) == INT32_MIN) continue; /* noise: no span */
        Py_ssize_t lo = (Py_ssize_t)(heap[c] & 0xFFFFFFFFLL) * blk, hi = lo + blk < n ? lo + blk : n;
        Py_ssize_t centre = lo;
        for (Py_ssize_t i = lo + 1; i < hi; i++) centre = row[i] > row[centre] ? i : centre;
        Py_ssize_t start = centre - before;
        start = start > n - blk ? n - blk : start;
        start = start < 0 ? 0 : start;
        memcpy(out + start, row + start, (size_t)blk * sizeof(int32_t));
    }
    return 1;
}

static int check_buffer(Py_buffer *view, const char *name, Py_ssize_t items) {
    if (view->itemsize != 4 || view->len != items * 4) {
        PyErr_Format(PyExc_ValueError, "%s must hold %zd int32 items", name, items);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(cluster_key_doc,
             "cluster_key(bits, key, rows, n, blk, theta_bits, num_block, before) -> bool\n\n"
             "Write DBAC variant A's int32 ranking key of the C-contiguous int32 ``bits`` (rows x n)\n"
             "into ``key`` (rows x n): ``bits`` inside the spans of the ``num_block`` highest block\n"
             "peaks (noise blocks, peak below ``theta_bits``, seed none), ``bits ^ -2**31``\n"
             "elsewhere. False at the first row holding a score that is not plain (``key`` is then\n"
             "unspecified).");

static PyObject *cluster_key(PyObject *self, PyObject *args) {
    Py_buffer bits, key;
    Py_ssize_t rows, n, blk, num_block, before;
    int theta_bits;
    if (!PyArg_ParseTuple(args, "y*w*nnninn", &bits, &key, &rows, &n, &blk, &theta_bits, &num_block,
                          &before))
        return NULL;
    PyObject *result = NULL;
    if (rows < 0 || n < 1 || blk < 1 || blk > n || num_block < 1 || before < 0 || before >= blk) {
        PyErr_SetString(PyExc_ValueError, "cluster_key: need rows >= 0, 1 <= blk <= n, num_block >= 1, "
                                          "0 <= before < blk");
    } else if (check_buffer(&bits, "bits", rows * n) && check_buffer(&key, "key", rows * n)) {
        Py_ssize_t n_blocks = (n + blk - 1) / blk, k = num_block < n_blocks ? num_block : n_blocks;
        int64_t *heap = (int64_t *)malloc((size_t)k * sizeof(int64_t));
        if (heap == NULL) {
            PyErr_NoMemory();
        } else {
            int plain = 1;
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t r = 0; r < rows && plain; r++)
                plain = row_key((const int32_t *)bits.buf + r * n, (int32_t *)key.buf + r * n, n, blk,
                                (int32_t)theta_bits, k, before, heap);
            Py_END_ALLOW_THREADS
            free(heap);
            result = PyBool_FromLong(plain);
        }
    }
    PyBuffer_Release(&bits);
    PyBuffer_Release(&key);
    return result;
}

static PyMethodDef methods[] = {
    {"cluster_key", cluster_key, METH_VARARGS, cluster_key_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_dbac_c", "Compiled DBAC kernel (see clusterattn.dbac_compiled).", -1, methods,
};

PyMODINIT_FUNC PyInit__dbac_c(void) { return PyModule_Create(&module); }
