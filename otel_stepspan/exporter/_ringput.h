/* What otel_stepspan/exporter/_ringput.c lends the compiled step call (otel_stepspan/_stepcall.c).
 *
 * Why: after the GPU wait every cache line the engine thread touches is cold (benchmarks/
 * bench_paced.py). The step call therefore writes a step's fields as marshal bytes before the
 * engine's forward, while the batch it reads is still warm from the scheduler, and after the
 * forward only stamps the clock and copies those bytes into the ring: no Python object made, read
 * or released there. The ring's layout and the record format stay _ringput.c's own.
 *
 * The table is a capsule, RINGPUT_CAPSULE, read with PyCapsule_Import.
 */
#ifndef OTEL_STEPSPAN_RINGPUT_H
#define OTEL_STEPSPAN_RINGPUT_H

#include <Python.h>

#define RINGPUT_CAPSULE "otel_stepspan.exporter._ringput._C_API"
#define RINGPUT_API_VERSION 2

typedef struct {
    int version; /* RINGPUT_API_VERSION */
    /* the type of the sink's compiled submit (Producer.submitter) */
    PyTypeObject *submitter_type;
    /* 1 while the submitter's ring is open; 0 once it was closed (the sink then has another
     * submit, e.g. in a child after a fork): a caller that kept the submitter reads it again. */
    int (*live)(PyObject *submitter);
    /* 1 when the submitter knows `finish` by a number the exporter process may run and `statics`
     * by its number, both set; 0 when it does not yet (the sink's Python submit defines them on a
     * step of its own). Never leaves an error set. */
    int (*known_ids)(PyObject *submitter, PyObject *finish, PyObject *statics, long *finisher_id, long *static_id);
    /* `value` as marshal writes it (the plain values a step holds: None, bools, ints, floats, str,
     * tuples, lists, dicts), at *at, which moves past it; -1 and no error set when it cannot, or
     * does not fit before `end`. `depth`: how deep `value` sits already (nesting stops at 8). */
    int (*write_value)(unsigned char **at, unsigned char *end, PyObject *value, int depth);
    /* The CAPTURED message of otel_stepspan/exporter/wire.py for one step into the ring: `fields`,
     * `size` bytes, is the marshalled tuple of captured fields (write_value's), `error` the
     * exception the forward raised or NULL. A full ring, a closed one or a failure is counted
     * as the sink's Python path counts it. Never raises; leaves no error set. */
    void (*put_staged)(PyObject *submitter, long long start_ns, long long end_ns, long finisher_id, long static_id,
                       PyObject *error, const unsigned char *fields, size_t size);
} RingputAPI;

#endif
