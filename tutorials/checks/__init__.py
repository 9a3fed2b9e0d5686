"""Check cells for the tutorials' exercises.

Each tutorial's exercises have a module here (``ex01`` for tutorial 01, ...),
holding one function per exercise: ``check_*(answer)`` raises an
AssertionError that says what is wrong, and passes silently when the answer is
right.  A tutorial's check cell calls :func:`report`, which prints the verdict
for the student; ``tutorials/solutions/`` runs the same checks on the model
answers, and the test suite runs the solutions, so checks and answers stay
correct together.

An exercise the student has not done yet raises NotImplementedError (the
stub's body), and :func:`report` says so instead of failing: every tutorial
runs to the end before any exercise is done.
"""


def report(label, check, *answer):
    """Run ``check(*answer)`` and print whether the answer is right.

    Returns True (right), False (wrong, with the reason printed) or None
    (not attempted yet: the answer raised NotImplementedError).
    """
    try:
        check(*answer)
    except NotImplementedError:
        print(f"{label}: not attempted yet (replace the `raise NotImplementedError` with your answer)")
        return None
    except AssertionError as error:
        print(f"{label}: not right yet. {error}")
        return False
    print(f"{label}: correct")
    return True
