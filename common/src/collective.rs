//! The arithmetic of data-parallel sums, shared by the coordinator's relay
//! and the in-process ranks, so both add in the same order.

/// `parts[0] + parts[1] + …`, element-wise, added in rank order.
pub fn sum_in_rank_order(parts: &[&[f32]]) -> Result<Vec<f32>, String> {
    let Some(first) = parts.first() else {
        return Ok(Vec::new());
    };
    let mut out = first.to_vec();
    for (r, p) in parts.iter().enumerate().skip(1) {
        if p.len() != out.len() {
            return Err(format!("rank {r} sent {} values, rank 0 sent {}", p.len(), out.len()));
        }
        for (o, x) in out.iter_mut().zip(p.iter()) {
            *o += x;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_elementwise_and_names_a_short_rank() {
        assert_eq!(sum_in_rank_order(&[&[1.0, 2.0], &[0.5, -2.0], &[1.0, 1.0]]).unwrap(), vec![2.5, 1.0]);
        assert_eq!(sum_in_rank_order(&[&[1.0, 2.0], &[1.0]]).unwrap_err(), "rank 1 sent 1 values, rank 0 sent 2");
    }
}
